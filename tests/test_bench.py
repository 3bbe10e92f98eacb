"""Smoke test of ``benchmarks/bench.py``: every model at toy sizes, one round, graphs run op by op."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import bench  # noqa: E402

MODELS = ["mlp", "vit", "gpt2", "resnet"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """The rows of one run over every model, and the folder of its JSON and CSV files."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--model", *MODELS, "--width", "64", "--batch", "8", "--tokens", "16", "--image", "8", "--blocks", "1",
            "--rounds", "1", "--compiler", "eager", "--variant", "grad=both, p=0.5, min_dim=8, min_speedup=0",
            "--json", str(out / "rows.json"), "--csv", str(out / "rows.csv")]
    return bench.main(argv), out


def test_rows_per_model_and_variant(bench_run):
    rows, _ = bench_run
    assert [(r["model"], r["variant"]) for r in rows] == [
        (m, v) for m in MODELS for v in ("exact aot_eager", "grad=both p=0.5 min_dim=8 min_speedup=0")]


def test_exact_row_is_one_and_values_plausible(bench_run):
    rows, _ = bench_run
    for r in rows:
        exact = r["variant"].startswith("exact")
        for key in ("fwd_ratio", "bwd_ratio", "step_ratio", "saved_ratio", "compile_ratio", "bwd_flop_ratio",
                    "ideal_bwd", "ideal_step"):
            assert r[key] > 0 and math.isfinite(r[key]), (r["model"], key)
            assert not exact or r[key] == 1.0, (r["model"], key)
        assert r["step_ms"] >= r["bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["saved_mb"] > 0 and r["compile_s"] > 0
        assert r["peak_mb"] is None and r["peak_ratio"] is None  # CUDA only
        assert (r["pass_s"] is None) == exact
        if not exact:  # grad="both" at p=0.5 samples every layer wide enough: about half the backward GEMMs
            assert 0.45 < r["bwd_flop_ratio"] < 0.75 and r["ideal_bwd"] < r["ideal_step"] < 1, r
            assert 0 < r["pass_s"] < r["compile_s"]


def test_json_and_csv_written(bench_run):
    rows, out = bench_run
    assert json.loads((out / "rows.json").read_text())["rows"] == rows
    assert len((out / "rows.csv").read_text().splitlines()) == len(rows) + 1


def test_parse_variant():
    assert bench.parse_variant("grad=weight,p=0.25, axis=features,seed=None") == {
        "grad": "weight", "p": 0.25, "axis": "features", "seed": None}
    assert bench.parse_variant("p=auto,key=(1, 2)") == {"p": "auto", "key": (1, 2)}
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        bench.parse_variant("grad")


def test_break_even_runs_and_finds_the_narrowest_paying_width(tmp_path):
    """``benchmarks/break_even.py`` at toy sizes (timings are not checked), and its summary on
    given ratios: the narrowest width from which every wider one pays."""
    import break_even

    rows = break_even.main(["--rows", "64", "--widths", "8", "16", "--rounds", "1", "--json", str(tmp_path / "b.json")])
    assert [(r["rows"], r["width"], r["k"]) for r in rows] == [(64, 8, 16), (64, 16, 16)]
    assert all(r["norm_us"] > 0 and r["uniform_us"] > 0 for r in rows)
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == rows
    ratios = [(64, 1.4), (128, 0.9), (192, 1.01), (256, 0.8), (512, 0.5)]
    given = [{"rows": 2048, "width": w, "norm_ratio": r} for w, r in ratios]
    assert break_even.break_even(given, 2048, "norm") == 256
    assert break_even.break_even(given[:1], 2048, "norm") is None


def test_break_even_times_the_controlled_call_and_the_convolution():
    """``--auto`` and ``--conv`` at toy sizes: one record per shape, a time for each sketch timed."""
    import break_even

    (auto,) = break_even.main(["--auto", "--rows", "64", "--widths", "32", "--rounds", "1"])
    assert auto["s"] == 64 and auto["k"] == 16 and auto["auto_norm_us"] > 0
    (conv,) = break_even.main(["--conv", "8,4,4,8,3", "--rounds", "1"])
    assert (conv["s"], conv["k"], conv["x"], conv["y"]) == (8 * 64, 2 * 64, 4, 36)
    assert conv["elements"] == 8 * 4 * 64 * 2  # G and x, each 8 samples of 4 channels at 8 x 8
    assert conv["norm_us"] > 0 and conv["uniform_us"] > 0


def test_break_even_fit_recovers_a_known_cost_model():
    """Timings made by a known :class:`CostModel` (with a rectangular shape) give it back."""
    import break_even
    from ubcompile.cost_model import CostModel

    truth = CostModel(fixed_us=150.0, per_element_us=0.0004, per_mac_us=1e-05)
    shapes = [(rows, x, y) for rows in (256, 1024, 4096) for x, y in ((64, 64), (256, 256), (64, 256), (1024, 1024))]
    # a GEMM's operands (s (x + y) elements) and a 3x3 convolution's (G and x: a ninth of the unfolded y)
    reads = [r * (x + y) for r, x, y in shapes] + [r * (x + y // 9) for r, x, y in shapes]
    results = [{"s": r, "x": x, "y": y, "k": r // 4, "elements": e, "exact_us": truth.exact_us(r, x, y),
                "norm_us": truth.sampled_us(r, r // 4, x, y, elements=e)} for (r, x, y), e in zip(shapes * 2, reads)]
    fitted = break_even.fit(results, "norm")
    assert fitted.fixed_us == pytest.approx(truth.fixed_us, rel=1e-3)
    assert fitted.per_element_us == pytest.approx(truth.per_element_us, rel=1e-2)
    assert fitted.per_mac_us == pytest.approx(truth.per_mac_us, rel=1e-2)
    doubled = [{**r, "norm_us": r["norm_us"] + 150.0} for r in results]  # a fixed cost it must see
    assert break_even.fit(doubled, "norm").fixed_us == pytest.approx(300.0, rel=1e-3)


def test_break_even_fit_recovers_a_convolution_model_from_two_fractions():
    """A convolution's model: an exact time partly bound by its reads, and kept copies whose cost
    grows with ``k / s``, told apart from the reads by timings at two fractions."""
    import break_even
    from ubcompile.cost_model import CostModel

    truth = CostModel(fixed_us=400.0, per_element_us=3e-4, per_mac_us=1.2e-5, exact_per_element_us=5e-4,
                      per_kept_element_us=6e-4)
    shapes = [(s, x, y, e) for s in (18432, 100352) for x, y, e in ((64, 9, 7e6), (128, 64, 16e6), (128, 1152, 5e6))]
    results = [{"s": s, "x": x, "y": y, "k": int(s * p), "elements": e, "exact_us": truth.exact_us(s, x, y, elements=e),
                "auto_norm_us": truth.sampled_us(s, int(s * p), x, y, elements=e)}
               for s, x, y, e in shapes for p in (0.25, 0.5)]
    fitted = break_even.fit(results, "auto_norm", exact_reads=True)
    for field in ("fixed_us", "per_element_us", "per_mac_us", "exact_per_element_us", "per_kept_element_us"):
        assert getattr(fitted, field) == pytest.approx(getattr(truth, field), rel=1e-2), field
    one_fraction = [r for r in results if r["k"] * 4 == r["s"]]
    assert break_even.fit(one_fraction, "auto_norm", exact_reads=True).per_kept_element_us == 0.0
