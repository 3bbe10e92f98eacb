"""Where a sampled GEMM starts to pay: one weight-gradient product, sampled against exact, by width.

    python benchmarks/break_even.py                                   # CPU, float32
    python benchmarks/break_even.py --device cuda --dtype bfloat16    # a GPU
    python benchmarks/break_even.py --rows 2048 8192 --widths 64 128 256 512 --p 0.25 --sketch norm uniform
    python benchmarks/break_even.py --rows 256 1024 4096 --widths 64 256 1024 64x256 --fit   # the cost model

A linear layer of width ``d`` (``d`` inputs, ``d`` outputs) on ``rows`` batch/token rows has the
weight gradient ``G^T A``: ``(d x rows) @ (rows x d)``, ``2 rows d^2`` FLOPs, with ``G^T`` a transposed
view as in the backward graph. The sampled op (``torch.ops.ubcompile.sampled_gemm``, what the pass
inserts under the default ``grad="weight"``) reads both operands for the terms' norms (``"norm"``;
``"uniform"`` reads nothing), draws ``k = ceil(p rows)`` rows, gathers them and multiplies:
``2 k d^2`` FLOPs plus about ``rows (2 d)`` elements read and a fixed cost per call. The FLOPs it
saves grow as ``d^2``, what it adds as ``d``: below some width it costs more than it saves.

A width ``XxY`` times a layer of ``Y`` inputs and ``X`` outputs. ``--fit`` fits
:class:`ubcompile.cost_model.CostModel`'s constants to the timings (least squares in relative error) and
prints them with the ratio the model predicts beside each measured one: the rule that keeps narrow
products exact (``min_speedup``) reads them from ``ubcompile/cost_model.py``. ``--conv`` times
convolutions' weight gradients (their fit adds the exact backward's cost per operand element read);
``--p`` takes several fractions, whose timings fit the kept copies' cost per element apart.

Each round times one call of the exact ``mm`` and one of each sketch on the same warm operands
(interleaved; medians over ``--rounds``). Operands read cold in a real step make the exact product
a little slower too, so these ratios are the op's own cost, not a step's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Optional

import torch

import bench
import ubcompile  # noqa: F401  (registers torch.ops.ubcompile)
from ubcompile.auto import BASES_EVERY, AutoController
from ubcompile.auto.policy import conv_site_shape
from ubcompile.cost_model import CostModel, predicted_speedup
from ubcompile.estimator_ops import CONTRACTED
from ubcompile.sketches.conv import BATCH, ConvGeometry
from ubcompile.sketches import keep_count


def time_of(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device synchronized before and after."""
    bench.synchronize(device)
    start = time.perf_counter()
    fn()
    bench.synchronize(device)
    return time.perf_counter() - start


def shape(text: str) -> tuple[int, int]:
    """``"D"`` or ``"XxY"``: the weight gradient's ``(outputs, inputs)``."""
    x, _, y = text.partition("x")
    return int(x), int(y or x)


def medians_of(calls: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each call over ``rounds`` interleaved rounds, after two warm-up calls each
    (which compile the op bodies)."""
    for fn in calls.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_of(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def record(medians: dict[str, float], sketches: list[str], s: int, k: int, x: int, y: int,
           elements: Optional[int] = None) -> dict[str, Any]:
    """One shape's timings, with the sampled dim ``s`` (``k`` kept) and the other two, ``x`` and ``y``,
    of the product's (implicit) GEMM, and the operand elements the sampled op reads (a GEMM's
    ``s (x + y)`` unless given): what :class:`CostModel` is fitted to."""
    return {"s": s, "k": k, "x": x, "y": y, "elements": s * (x + y) if elements is None else elements,
            "exact_us": 1e6 * medians["exact"],
            **{f"{name}_us": 1e6 * medians[name] for name in sketches},
            **{f"{name}_ratio": medians[name] / medians["exact"] for name in sketches}}


def measure(rows: int, width: tuple[int, int], p: float, sketches: list[str], rounds: int, device: torch.device,
            dtype: torch.dtype) -> dict[str, Any]:
    """The exact weight gradient ``G^T A`` against each sketch's ``sampled_gemm``, one shape."""
    x, y = width
    gen = torch.Generator(device=device).manual_seed(rows * x * y)
    g = torch.randn(rows, x, device=device, dtype=dtype, generator=gen)
    a = torch.randn(rows, y, device=device, dtype=dtype, generator=gen)
    seed = torch.tensor(12345, device=device)
    k = keep_count(rows, p)
    calls = {"exact": lambda: torch.mm(g.t(), a)}
    for sketch in sketches:
        calls[sketch] = (lambda s: lambda: torch.ops.ubcompile.sampled_gemm(g.t(), a, CONTRACTED, s, k, seed, 0, [], []))(sketch)
    return {"rows": rows, "width": x if x == y else None,
            **record(medians_of(calls, rounds, device), sketches, rows, k, x, y)}


def held_call(register: Callable[[AutoController], int], call: Callable[[AutoController, int], object],
              sketch: str, p: float) -> Optional[Callable[[], object]]:
    """A call of the one site of a fresh controller, held at ``sketch`` keeping ``p`` and never
    measuring after its first call (which measures); ``None`` where the site does not offer it.
    ``register`` registers the site and returns its key, ``call`` calls it (one controller per
    site: an allocation re-chooses every site)."""
    controller = AutoController(budget=0.1, measure_every=10 ** 9)
    key = register(controller)
    site = controller.sites[key]
    held = [i for i, o in enumerate(site.options) if o.sketch == sketch and o.p == p]
    if not held:
        return None
    call(controller, key)
    controller.collect(wait=True)
    site.set_option(held[0])
    site.next_measure = 10 ** 12
    return lambda: call(controller, key)


def measure_auto(rows: int, width: tuple[int, int], p: float, rounds: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
    """The exact weight gradient against ``p="auto"``'s controlled call held at keep fraction ``p``, on
    the norm sketch (``auto_norm``) and, where the site offers it, the residual sketch
    (``auto_residual``), neither measuring; each timed call is :data:`BASES_EVERY` calls (the residual
    sketch tracks its bases once in that many), divided by them."""
    x, y = width
    gen = torch.Generator(device=device).manual_seed(rows * x * y)
    g = torch.randn(rows, x, device=device, dtype=dtype, generator=gen)
    a = torch.randn(rows, y, device=device, dtype=dtype, generator=gen)
    seed = torch.tensor(12345, device=device)
    calls = {"exact": lambda: [torch.mm(g.t(), a) for _ in range(BASES_EVERY)]}
    for sketch in ("norm", "residual"):
        held = held_call(lambda c: c.register(sketch, (x, rows, y)),
                         lambda c, key: c.contraction(g.t(), a, key, seed, 0), sketch, p)
        if held is not None:
            calls[f"auto_{sketch}"] = (lambda held: lambda: [held() for _ in range(BASES_EVERY)])(held)
    medians = {name: t / BASES_EVERY for name, t in medians_of(calls, rounds, device).items()}
    names = [name for name in calls if name != "exact"]
    return {"rows": rows, "width": x if x == y else None,
            **record(medians, names, rows, keep_count(rows, p), x, y)}


def conv_shape(text: str) -> tuple[int, ...]:
    """``"B,C_in,C_out,HW,K[,STRIDE]"``: batch, channels, input height = width, kernel size, stride."""
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) not in (5, 6):
        raise argparse.ArgumentTypeError(f"expected B,C_in,C_out,HW,K[,STRIDE], got {text!r}")
    return parts if len(parts) == 6 else (*parts, 1)


def measure_conv(shape: tuple[int, ...], p: float, sketches: list[str], rounds: int, device: torch.device,
                 dtype: torch.dtype, auto: bool = False) -> dict[str, Any]:
    """A 2-D convolution's exact weight gradient (``convolution_backward``) against each sketch's
    ``sampled_conv_backward`` on its batch (the default ``grad="weight"``), or with ``auto``
    ``p="auto"``'s controlled call held at ``p`` (:func:`held_call`), one shape; padding
    ``K // 2`` (none when strided)."""
    batch, c_in, c_out, hw, kernel, stride = shape
    gen = torch.Generator(device=device).manual_seed(batch * c_in * c_out * hw)
    x = torch.randn(batch, c_in, hw, hw, device=device, dtype=dtype, generator=gen)
    w = torch.randn(c_out, c_in, kernel, kernel, device=device, dtype=dtype, generator=gen)
    geometry = ([stride] * 2, [kernel // 2 if stride == 1 else 0] * 2, [1, 1], False, [0, 0], 1)
    out = torch.nn.functional.conv2d(x, w, stride=geometry[0], padding=geometry[1])
    g = torch.randn(out.shape, device=device, dtype=dtype, generator=gen)
    seed = torch.tensor(12345, device=device)
    k = keep_count(batch, p)
    calls = {"exact": lambda: torch.ops.aten.convolution_backward(g, x, w, None, *geometry, [False, True, False])}
    positions = out.shape[2] * out.shape[3]
    if auto:
        site = conv_site_shape(g.shape, x.shape, w.shape, False)
        calls["auto_norm"] = held_call(
            lambda c: c.register("conv", site[0], family="conv", span=site[1], reads=site[2]),
            lambda c, key: c.conv_weight(g, x, w, ConvGeometry.of(*geometry), key, seed, 0), "norm", p)
    for sketch in [] if auto else sketches:
        calls[sketch] = (lambda s: lambda: torch.ops.ubcompile.sampled_conv_backward(
            g, x, w, *geometry, BATCH, [False, True], s, k, 1, seed, 0))(sketch)
    sketches = ["auto_norm"] if auto else sketches
    return {"conv": ",".join(map(str, shape)),
            **record(medians_of(calls, rounds, device), sketches, batch * positions, k * positions, c_out,
                     c_in * kernel * kernel, g.numel() + x.numel())}


def break_even(results: list[dict[str, Any]], rows: int, sketch: str) -> Optional[int]:
    """The narrowest width from which on every measured width's ratio is below 1 (``None``: none)."""
    widths = sorted((r["width"], r[f"{sketch}_ratio"]) for r in results
                    if r["rows"] == rows and r["width"] and f"{sketch}_ratio" in r)
    paying = None
    for width, ratio in reversed(widths):
        if ratio >= 1:
            break
        paying = width
    return paying


def _least_squares(design: list[list[float]], target: list[float], scale: list[float]) -> list[float]:
    """The coefficients of ``design`` that fit ``target`` best in error relative to ``scale``."""
    weights = torch.tensor([1 / t for t in scale], dtype=torch.float64)
    a = torch.tensor(design, dtype=torch.float64) * weights[:, None]
    b = (torch.tensor(target, dtype=torch.float64) * weights)[:, None]
    return torch.linalg.lstsq(a, b).solution[:, 0].tolist()


def fit(results: list[dict[str, Any]], sketch: str, exact_reads: bool = False) -> CostModel:
    """The :class:`CostModel` of ``sketch`` that fits ``results``. The exact product's time: the
    median time per multiply-add (``per_mac_us``), or with ``exact_reads`` (convolutions) the
    least-squares fit to ``per_mac * macs + exact_per_element * elements``. Then the least-squares
    fit, in error relative to each op's time, of that time less the kept share of the modelled exact
    product's to ``fixed + per_element * elements``, plus ``per_kept_element * (k / s) * elements``
    where the results hold several fractions ``k / s`` (with one, the two terms are one)."""
    if exact_reads:
        exact_us = [r["exact_us"] for r in results]
        per_mac, exact_per_element = _least_squares([[r["s"] * r["x"] * r["y"], r["elements"]] for r in results],
                                                    exact_us, exact_us)
    else:
        per_mac, exact_per_element = statistics.median(r["exact_us"] / (r["s"] * r["x"] * r["y"]) for r in results), 0.0
    exact = CostModel(0.0, 0.0, per_mac, exact_per_element)
    fractions = len({r["k"] / r["s"] for r in results}) > 1
    fixed, per_element, *per_kept = _least_squares(
        [[1.0, r["elements"]] + ([r["k"] / r["s"] * r["elements"]] if fractions else []) for r in results],
        [r[f"{sketch}_us"] - r["k"] / r["s"] * exact.exact_us(r["s"], r["x"], r["y"], elements=r["elements"])
         for r in results], [r[f"{sketch}_us"] for r in results])
    return CostModel(fixed_us=round(fixed, 1), per_element_us=float(f"{per_element:.3g}"),
                     per_mac_us=float(f"{per_mac:.3g}"), exact_per_element_us=float(f"{exact_per_element:.3g}"),
                     per_kept_element_us=float(f"{per_kept[0] if per_kept else 0.0:.3g}"))


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--widths", type=shape, nargs="+", default=[32, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
                    metavar="D|XxY")
    ap.add_argument("--p", type=float, nargs="+", default=[0.25], help="keep fractions, each timed and fitted")
    ap.add_argument("--sketch", nargs="+", default=["norm", "uniform"], choices=["norm", "uniform"])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--conv", type=conv_shape, nargs="+", metavar="B,C_in,C_out,HW,K[,STRIDE]",
                    help="time these 2-D convolutions' weight gradients instead of GEMMs")
    ap.add_argument("--auto", action="store_true",
                    help="time p='auto''s controlled call held at --p (norm and residual sketch; with --conv, "
                         "the norm sketch on the batch) instead of the op")
    ap.add_argument("--fit", action="store_true", help="fit and print each sketch's cost model")
    ap.add_argument("--json", help="write the machine, arguments and rows to this JSON file")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.conv:
        results = [measure_conv(shape, p, args.sketch, args.rounds, device, dtype, args.auto)
                   for p in args.p for shape in args.conv]
    elif args.auto:
        results = [measure_auto(rows, width, p, args.rounds, device, dtype)
                   for p in args.p for rows in args.rows for width in args.widths]
    else:
        results = [measure(rows, width, p, args.sketch, args.rounds, device, dtype)
                   for p in args.p for rows in args.rows for width in args.widths]
    sketches = ["auto_norm", "auto_residual"] if args.auto else args.sketch
    where = bench.machine(device, dtype)
    print(f"{where}; medians of {args.rounds} interleaved rounds\n")
    print("| shape | s x (x, y) | k / s | exact us | " + " | ".join(f"{s} us | {s} / exact" for s in sketches) + " |")
    print("|---" * (4 + 2 * len(sketches)) + "|")
    for r in results:
        cells = " | ".join(f"{r[f'{s}_us']:.0f} | {r[f'{s}_ratio']:.2f}" if f"{s}_us" in r else "- | -"
                           for s in sketches)
        print(f"| {r.get('conv') or r['rows']} | {r['s']} x ({r['x']}, {r['y']}) | {r['k'] / r['s']:.2f} | "
              f"{r['exact_us']:.0f} | {cells} |")
    print()
    for p in [] if args.conv else args.p:
        for rows in args.rows:
            for s in sketches:
                width = break_even([r for r in results if r["k"] == keep_count(rows, p)], rows, s)
                print(f"p {p}, rows {rows}, {s}: " + (f"pays (ratio < 1) from width {width} on" if width else
                                                      "does not pay at the widest width measured"))
    timed = {s: [r for r in results if f"{s}_us" in r] for s in sketches}
    models = {s: fit(timed[s], s, exact_reads=bool(args.conv)) for s in sketches if timed[s]} if args.fit else {}
    for s, model in models.items():
        predicted = " ".join(f"{r['s']}x{r['x']}x{r['y']}: {r[f'{s}_ratio']:.2f}/"
                             f"{1 / predicted_speedup(model, r['s'], r['k'], r['x'], r['y'], elements=r['elements']):.2f}"
                             for r in timed[s])
        print(f"\n{s}: {model}\n  measured/modelled op / exact: {predicted}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": where, "torch": torch.__version__, "args": vars(args), "rows": results,
                       "fit": {s: dataclasses.asdict(m) for s, m in models.items()}}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
