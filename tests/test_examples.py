"""Smoke runs of the examples on tiny synthetic data: every script's training loop, record and report."""

import gzip
import json
import math
import os
import pathlib
import runpy
import struct
import subprocess
import sys

import numpy as np
import pytest

from ubcompile.config import SamplingConfig

import char_gpt
import experiment
import fashion_bagnet
import fashion_mlp
import fashion_vit
import auto_report
import sweep
import sweep_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMON = ["--epochs", "1", "--batch", "64", "--p", "0.5", "--grad", "both", "--evals-per-epoch", "2",
          "--no-progress", "--compiler", "eager"]  # the same rewritten graphs, without Inductor's compile time


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """Fashion-MNIST-shaped idx files of random pixels: 256 training and 100 test images."""
    path = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 100)):
        write_idx(path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return path


def tiny(name, fashion_dir, text_file):
    """The example's module and the options of a tiny run of it (on top of :data:`COMMON`)."""
    fashion = ["--data-dir", str(fashion_dir)]
    return {
        "mlp": (fashion_mlp, fashion + ["--width", "64"]),
        "bagnet": (fashion_bagnet, fashion + ["--width", "8", "--min-dim", "8"]),
        "vit": (fashion_vit, fashion + ["--dim", "32", "--depth", "1", "--min-dim", "16"]),
        "gpt": (char_gpt, ["--text", str(text_file), "--dim", "32", "--depth", "1", "--context", "16",
                           "--steps-per-epoch", "4", "--min-dim", "16"]),
    }[name]


def run_tiny(module, argv):
    args = experiment.parse_args(COMMON + argv, module.__doc__, module.LR, module.EPOCHS, module.OPTIMIZER,
                                 module.add_arguments)
    return experiment.run(module.build_task(args), args)


@pytest.fixture(scope="module")
def mlp_records(fashion_dir, text_file):
    """A tiny exact and a tiny sampled run of the MLP example."""
    module, argv = tiny("mlp", fashion_dir, text_file)
    return [run_tiny(module, argv + ["--exact"]), run_tiny(module, argv)]


@pytest.mark.parametrize("name", ["mlp", "bagnet", "vit", "gpt"])
def test_example_trains_sampled_and_records_its_curve(name, fashion_dir, text_file, mlp_records):
    record = mlp_records[1] if name == "mlp" else run_tiny(*tiny(name, fashion_dir, text_file))
    json.dumps(record)  # the record is plain JSON
    assert record["task"] == name and record["status"] == "ok" and record["label"] == "both:norm p=0.5"
    flops = record["bwd_gflop_per_step"]
    assert 0 < flops["sampled"] < flops["exact"]
    curve = record["curve"]
    steps = record["steps_per_epoch"]
    assert [pt["step"] for pt in curve] == [0, steps // 2, steps]
    assert [pt["time_s"] for pt in curve] == sorted(pt["time_s"] for pt in curve) and curve[0]["time_s"] == 0
    assert curve[-1]["bwd_gflop"] == pytest.approx(steps * flops["sampled"])
    assert all(0 <= pt["acc"] <= 100 for pt in curve) and record["final_acc"] == curve[-1]["acc"]


def test_example_command_line_writes_json(fashion_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    script = ROOT / "examples" / "fashion_mlp.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--data-dir", str(fashion_dir), "--width", "64", "--batch", "64",
                                      "--epochs", "0.5", "--grad", "weight", "--sketch", "uniform", "--p", "0.5",
                                      "--min-dim", "16", "--no-progress", "--json", str(out)])  # Inductor
    runpy.run_path(str(script), run_name="__main__")
    record = json.loads(out.read_text())
    assert record["label"] == "weight:uniform p=0.5" and record["config"]["axis"] == "rows"
    assert "mlp weight:uniform p=0.5 lr 0.05 seed 0: final test acc" in capsys.readouterr().out


def test_digits_demo(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo_digits.py"), "--epochs", "1",
                             "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact (inductor)" in result.stdout and "backward GEMM FLOPs" in result.stdout
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["grad"], r["sketch"]) for r in results] == [
        (None, "-"), ("weight", "norm"), ("both", "norm"), ("both", "uniform")]


def test_too_short_a_run_is_an_error(fashion_dir):
    with pytest.raises(ValueError, match="less than one step"):
        run_tiny(fashion_mlp, ["--data-dir", str(fashion_dir), "--epochs", "0.1"])


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        run_tiny(fashion_mlp, ["--data-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="make data"):
        run_tiny(char_gpt, ["--data-dir", str(tmp_path)])


def test_sweep_grid():
    configs = sweep.grid("mlp")
    exact_lr = sum(c["lr"] == fashion_mlp.LR for c in configs)
    assert exact_lr == len(sweep.SEEDS) * (1 + len(sweep.GRADS) * len(sweep.SKETCHES) * len(sweep.PS))
    assert len(configs) - exact_lr == 1 + len(sweep.GRADS) * len(sweep.SKETCHES)  # lower lr: exact and p = 0.25
    assert len({sweep.key(c) for c in configs}) == len(configs)
    for c in configs:
        args = sweep.parse(c)
        assert (args.exact, args.lr, args.seed, args.threads) == (c.get("exact", False), c["lr"], c["seed"], 1)


def test_a_vcas_run_off_its_default_tau_is_a_run_of_its_own():
    run = {"model": "gpt", "lr": sweep.WIDE_STABLE_LR, "seed": 100, "size": "wide", "vcas": True}
    assert sweep.key(run) == sweep.key({**run, "vcas_tau": sweep.DEFAULT_VCAS_TAU})  # older records name no tau
    assert sweep.key({**run, "vcas_tau": 0.25}) != sweep.key(run)
    args = sweep.parse({**run, "vcas_tau": 0.25})
    assert (args.vcas, args.vcas_tau, experiment.label(args)) == (True, 0.25, "vcas tau=0.25")
    assert experiment.label(sweep.parse(run)) == "vcas"
    matched = sweep.GRIDS["wide-vcas-matched"][0]("gpt")
    assert [c["seed"] for c in matched] == list(sweep.WIDE_SEEDS)
    assert {c["vcas_tau"] for c in matched} == {sweep.MATCHED_VCAS_TAU["gpt"]} != {sweep.DEFAULT_VCAS_TAU}


def test_the_wide_vcas_grids_pair_each_model_with_its_p_auto_runs():
    """Each model's VCAS runs at the learning rate and seeds of its width-256 ``p="auto"`` runs (the GPT's at
    ``WIDE_STABLE_LR``, the ViT's at its own), at its own matched ``tau``; the GPT's keys are those of its
    records made before the ViT was added (2026-12-07)."""
    auto = {m: {(c["lr"], c["seed"]) for c in sweep.GRIDS[g][0](m) if c.get("p") == "auto"}
            for m, g in (("gpt", "wide-stable"), ("vit", "wide-layer"))}
    for model in ("gpt", "vit"):
        for grid, tau in (("wide-vcas", sweep.DEFAULT_VCAS_TAU), ("wide-vcas-matched", sweep.MATCHED_VCAS_TAU[model])):
            assert model in sweep.GRIDS[grid][2]
            runs = sweep.GRIDS[grid][0](model)
            assert {(c["lr"], c["seed"]) for c in runs} == auto[model]
            for c in runs:
                args = sweep.parse(c)
                assert (args.vcas, args.vcas_tau, args.dim) == (True, tau, 256)
    assert sweep.GRIDS["wide-vcas-matched"][0]("vit")[0]["lr"] == fashion_vit.LR != sweep.WIDE_STABLE_LR
    assert sweep.key(sweep.GRIDS["wide-vcas-matched"][0]("gpt")[0]) == (
        "gpt", False, None, None, None, sweep.WIDE_STABLE_LR, 100, None, "vcas", 0.8)
    assert sweep.key(sweep.GRIDS["wide-vcas"][0]("gpt")[0]) == (
        "gpt", False, None, None, None, sweep.WIDE_STABLE_LR, 100, None, "vcas")


def test_the_matched_vcas_grid_pairs_the_mlp_with_its_layer_scaled_runs():
    """The MLP's VCAS runs at its matched ``tau``: the seeds and learning rate of ``vcas`` and ``layer-scale``,
    into ``vcas_runs.jsonl`` beside VCAS's default runs, each with a key of its own."""
    assert sweep.GRIDS["vcas-matched"][1:] == (sweep.GRIDS["vcas"][1], ("mlp",))
    runs = sweep.GRIDS["vcas-matched"][0]("mlp")
    default, auto = sweep.GRIDS["vcas"][0]("mlp"), sweep.GRIDS["layer-scale"][0]("mlp")
    assert [(c["lr"], c["seed"]) for c in runs] == [(c["lr"], c["seed"]) for c in default] == [
        (c["lr"], c["seed"]) for c in auto]
    assert not {sweep.key(c) for c in runs} & {sweep.key(c) for c in default}
    for c in runs:
        args = sweep.parse(c)
        assert (args.vcas, args.vcas_tau, args.width) == (True, sweep.MATCHED_VCAS_TAU_CONFIRM["mlp"], 1024)
    assert sweep.key(runs[0]) == ("mlp", False, None, None, None, fashion_mlp.LR, 16, None, "vcas", 0.017)


def test_the_timed_grids_pair_each_model_with_its_earlier_runs_under_a_key_and_label_of_their_own():
    """``wide-timed`` and ``timed``: ``p="auto"`` with the cost rule on, at the learning rates and seeds
    of the runs it is compared with; its key and label name ``min_speedup`` (every earlier record ran
    without the rule and names none)."""
    for model in sweep.WIDE_TRANSFORMERS:
        runs = sweep.GRIDS["wide-timed"][0](model)
        earlier = [c for c in sweep.GRIDS["wide-vcas"][0](model)]
        assert [(c["lr"], c["seed"]) for c in runs] == [(c["lr"], c["seed"]) for c in earlier]
        untimed = [{k: v for k, v in c.items() if k != "min_speedup"} for c in runs]
        assert not {sweep.key(c) for c in runs} & {sweep.key(c) for c in untimed}
        args = sweep.parse(runs[0])
        assert (args.p, args.min_speedup) == ("auto", 1.0)
        assert experiment.label(args) == "auto budget=0.1 layer min_speedup=1"
        assert experiment.label(sweep.parse(untimed[0])) == "auto budget=0.1 layer"
    timed, layer = sweep.GRIDS["timed"][0]("mlp"), sweep.GRIDS["layer-scale"][0]("mlp")
    assert sweep.GRIDS["timed"][1] == sweep.GRIDS["layer-scale"][1]
    assert [(c["lr"], c["seed"]) for c in timed] == [(c["lr"], c["seed"]) for c in layer]
    assert not {sweep.key(c) for c in timed} & {sweep.key(c) for c in layer}


def test_the_wide_conv_grid_pairs_exact_and_default_auto_on_the_64_channel_bagnet():
    runs = sweep.GRIDS["wide-conv"][0]("bagnet")
    exact, auto = [c for c in runs if c.get("exact")], [c for c in runs if not c.get("exact")]
    assert [c["seed"] for c in exact] == [c["seed"] for c in auto] == list(sweep.WIDE_SEEDS)
    args = sweep.parse(auto[0])
    assert (args.p, args.min_speedup, args.budget_scale, args.width, args.epochs) == ("auto", 1.0, "layer", 64, 10)
    assert sweep.parse(exact[0]).exact and "bagnet" not in sweep.GRIDS["wide"][2]


def test_auto_minus_each_vcas_run_of_the_same_seed():
    def runs(label, accs):
        return [{"label": label, "status": "ok", "final_acc": acc, "config": {"seed": seed}}
                for seed, acc in zip((100, 101, 102), accs)]
    groups = {auto_report.DEFAULT_LABEL: runs(auto_report.DEFAULT_LABEL, [30.0, 31.0, 32.0]),
              "vcas": runs("vcas", [29.0, 31.0, 33.0]), "vcas tau=0.25": runs("vcas tau=0.25", [29.0, 30.0])}
    assert auto_report.versus_vcas(groups)[3:] == ["| vcas | 100-102 | 0.00 ± 0.58 |",
                                                   "| vcas tau=0.25 | 100-101 | 1.00 ± 0.00 |"]
    assert auto_report.versus_vcas({"vcas": groups["vcas"]}) == []


def test_report_draws_plots_and_tables(mlp_records, tmp_path, monkeypatch):
    lr = fashion_mlp.LR
    assert [sweep.record_key(r) for r in mlp_records] == [
        sweep.key({"model": "mlp", "exact": True, "lr": lr, "seed": 0}),
        sweep.key({"model": "mlp", "grad": "both", "sketch": "norm", "p": 0.5, "lr": lr, "seed": 0})]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mlp_records))
    monkeypatch.setattr(sys, "argv", ["sweep_report.py", "--out", str(tmp_path)])
    monkeypatch.setattr(sweep, "PS", (0.5,))
    sweep_report.main()
    assert (tmp_path / "mlp_curves.png").stat().st_size > 0 and (tmp_path / "final_vs_p.png").stat().st_size > 0
    table = (tmp_path / "tables.md").read_text()
    assert "| exact |" in table and "| both:norm p=0.5 |" in table


def test_auto_run_records_fractions_and_the_auto_report_reads_them(fashion_dir, text_file, mlp_records, tmp_path,
                                                                  monkeypatch):
    module, argv = tiny("mlp", fashion_dir, text_file)
    # budget 1 at the default scale: on this noise data the default budget keeps every layer exact
    record = run_tiny(module, argv + ["--p", "auto", "--grad", "weight", "--min-dim", "32", "--budget", "1"])
    json.dumps(record)
    label = experiment.auto_label(1.0, SamplingConfig.budget_scale)
    assert record["label"] == label and record["status"] == "ok"
    sites = record["auto"]["sites"]
    assert [s["module"] for s in sites] == ["7", "5", "3", "1"] and all(s["timeline"] for s in sites)
    flops = record["bwd_gflop_per_step"]
    assert 0 < flops["sampled"] < flops["exact"]
    assert record["curve"][-1]["bwd_gflop"] == pytest.approx(record["curve"][-1]["step"] * flops["sampled"])
    (tmp_path / "auto_runs.jsonl").write_text(json.dumps(mlp_records[0]) + "\n" + json.dumps(record) + "\n")
    monkeypatch.setattr(sys, "argv", ["auto_report.py", "--out", str(tmp_path)])
    auto_report.main()
    assert (tmp_path / "auto_fractions.png").stat().st_size > 0
    assert f"| {label} |" in (tmp_path / "auto.md").read_text()


def test_residual_check_writes_its_table(fashion_dir, tmp_path, monkeypatch):
    out = tmp_path / "residual.md"
    script = ROOT / "examples" / "residual_check.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--data-dir", str(fashion_dir), "--width", "64",
                                      "--steps", "1", "2", "--stale", "1", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    sketches, stale = out.read_text().split("## Bases reused")
    stale, tracked = stale.split("## Bases tracked")  # no refresh in two steps: its table has no rows
    rows = [line for line in sketches.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 * 3  # two steps, three hidden layers
    # step 1 has no older bases; step 2 has step 1's, at some multiple of its own bases' variance
    cells = [line.split("|")[3].strip() for line in stale.splitlines() if line.startswith("| ")][1:]
    assert [c != "" for c in cells] == [False] * 3 + [True] * 3


def test_the_scale_recipe_trains_on_two_ranks_with_torchrun(tmp_path):
    script = ROOT / "examples" / "train_at_scale.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               "--steps", "3", "--width", "64", "--depth", "2", "--batch", "64", "--compiler", "eager",
               "--min-speedup", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UBCOMPILE_EAGER_KERNELS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert "16/64 rows" in done.stdout and "2 sampled" in done.stdout  # up's and down's weight gradients
