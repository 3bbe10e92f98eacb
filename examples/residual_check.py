"""How much variance the residual sketch removes, at equal FLOPs, on the experiments' MLP.

    python examples/residual_check.py [--out docs/experiments/residual.md] [--width 1024] [--steps 1 40 120 234]
                                      [--stale 1 5 10 25 50]

Trains the Fashion-MNIST MLP (784-1024-1024-1024-10, SGD, the experiments' settings) exactly and,
at a few steps, takes each hidden layer's weight-gradient product ``T = G^T A`` (batch rows
contracted). For the plain norm sketch at ``p = 0.25`` (``k = 64`` of 256 rows) and for the
residual sketch (:mod:`ubcompile.sketches.residual`, rank 8, one power iteration) at the same
``k`` and at the ``k`` that costs the same GEMM FLOPs, it reports ``V_sketch / V_sgd``: the
Poisson variance of each sketch (:mod:`ubcompile.sketches.control`) over the minibatch-SGD
variance of ``T``, the ratio ``p="auto"``'s budget bounds.

``p="auto"`` makes a site's bases at its measurements and reuses them for a few calls
(:mod:`ubcompile.auto`): a second table gives the residual sketch's variance at the same ``k`` with
bases made ``d`` steps earlier, on earlier batches, over its variance with the step's own bases. A
third follows bases refreshed every 5 steps by one power iteration from the last ones
(:func:`~ubcompile.sketches.residual.tracked_bases`, fresh every 50) against fresh bases on the
same batch.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import pathlib
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

import fashion_data
from models import mlp
from ubcompile.sketches.control import sgd_variance, sketch_variances
from ubcompile.sketches.norm import contraction_importance, factor_norms
from ubcompile.sketches.residual import ResidualSplit, residual_flops, tracked_bases

P, RANK, BATCH, LR = 0.25, 8, 256, 0.05
REFRESH, FRESH = 5, 50  # p="auto"'s BASES_EVERY, and its measurement gap once grown


def equal_cost_k(m: int, n: int, big_n: int, k: int) -> int:
    """The largest ``k'`` whose residual sketch costs at most the norm sketch's ``2 m N k``."""
    return max((j for j in range(1, n + 1) if residual_flops(m, n, big_n, RANK, j) <= 2 * m * big_n * k), default=0)


def ratios(g: torch.Tensor, a: torch.Tensor, gen: torch.Generator) -> tuple[float, float, float, int]:
    """``V / V_sgd`` of the norm sketch, the residual sketch at the same ``k`` and at equal FLOPs (and that ``k``)."""
    x, y = g.T.contiguous(), a
    (m, n), big_n = x.shape, y.shape[1]
    k = round(P * n)
    importance = contraction_importance(x, y)
    v_sgd = sgd_variance(importance.double().square(), float((x @ y).double().square().sum()))
    residual = ResidualSplit.of(x, y, RANK, gen).importance(*factor_norms(x, y))
    k_equal = equal_cost_k(m, n, big_n, k)
    plain, = sketch_variances(importance, [k])
    same, equal = sketch_variances(residual, [k, k_equal]) if k_equal else (*sketch_variances(residual, [k]), float("nan"))
    return plain / v_sgd, same / v_sgd, equal / v_sgd, k_equal


def staleness(g: torch.Tensor, a: torch.Tensor, bases: list[ResidualSplit]) -> list[float]:
    """The residual sketch's variance at ``k = P n`` with each split's bases ``u``, ``v`` (made on
    earlier batches) over its variance with the first: the cost of reusing bases across steps."""
    x, y = g.T.contiguous(), a
    norms = factor_norms(x, y)
    k = round(P * x.shape[1])
    variances = [sketch_variances(ResidualSplit.on_bases(x, y, b.u, b.v).importance(*norms), [k])[0]
                 for b in bases]
    return [v / variances[0] for v in variances]


def tracking_ratio(g: torch.Tensor, a: torch.Tensor, tracked: ResidualSplit, gen: torch.Generator) -> float:
    """The residual sketch's variance at ``k = P n`` with ``tracked``'s bases over its variance with
    fresh ones (random probes, one power iteration) made on the same batch."""
    x, y = g.T.contiguous(), a
    norms = factor_norms(x, y)
    k = round(P * x.shape[1])
    fresh, = sketch_variances(ResidualSplit.of(x, y, RANK, gen).importance(*norms), [k])
    ours, = sketch_variances(tracked.importance(*norms), [k])
    return ours / fresh


def _record(saved: dict[tuple[str, str], torch.Tensor], name: str, _module: nn.Module,
            inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """Keep the layer's input ``A`` and, once the backward reaches it, its output's cotangent ``G``."""
    saved[(name, "a")] = inputs[0].detach()
    output.register_hook(lambda grad: saved.__setitem__((name, "g"), grad.detach()))


def tracking_table(tracking: dict[str, list[tuple[int, float]]]) -> str:
    """Per layer and stretch of training, the spread of :func:`tracking_ratio` over the refreshes."""
    spans = [(1, FRESH), (FRESH + 1, 3 * FRESH), (3 * FRESH + 1, None)]
    rows = []
    for name, ratios in tracking.items():
        for lo, hi in spans:
            r = sorted(v for step, v in ratios if step >= lo and (hi is None or step <= hi))
            if r:
                rows.append(f"| {lo}-{hi or 'end'} | {name} | {len(r)} | {r[len(r) // 2]:.2f} | {min(r):.2f} | {max(r):.2f} |")
    return (f"## Bases tracked across refreshes: every {REFRESH} steps one power iteration from the last bases "
            f"(fresh every {FRESH} steps), residual variance at k = {round(P * BATCH)} over that with fresh bases "
            "made on the same batch\n\n| steps | layer | refreshes | median | min | max |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parents[1] / "docs" / "experiments" / "residual.md")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 40, 120, 234], help="training steps to measure at")
    ap.add_argument("--stale", type=int, nargs="+", default=[1, 5, 10, 25, 50],
                    help="ages of the reused bases, in steps")
    ap.add_argument("--data-dir", help="Fashion-MNIST idx files (default: see examples/fashion_data.py)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x_tr, y_tr, _, _ = fashion_data.load_fashion_mnist(args.data_dir)
    x_tr, y_tr = fashion_data.normalize(x_tr[:20000]), y_tr[:20000]
    model = mlp([784] + [args.width] * 3 + [10])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    hidden = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear) and m.out_features > 10]
    saved: dict[tuple[str, str], torch.Tensor] = {}
    for name, m in hidden:
        m.register_forward_hook(functools.partial(_record, saved, name))
    batches, gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    rows: list[str] = []
    stale_rows: list[str] = []
    history = {name: collections.deque(maxlen=max(args.stale) + 1) for name, _ in hidden}  # newest first
    tracked: dict[str, ResidualSplit] = {}  # each layer's bases as p="auto" would track them
    tracking: dict[str, list[tuple[int, float]]] = {name: [] for name, _ in hidden}  # (step, ratio) at each refresh
    step = 0
    while step < max(args.steps):
        for idx in fashion_data.full_batches(len(x_tr), BATCH, batches):
            step += 1
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            for name, _ in hidden:
                g, a = saved[(name, "g")], saved[(name, "a")]
                history[name].appendleft(ResidualSplit.of(g.T.contiguous(), a, RANK, gen))
                if (step - 1) % REFRESH == 0:  # refreshed: fresh at a measurement, else tracked
                    x = g.T.contiguous()
                    if (step - 1) % FRESH == 0:
                        tracked[name] = ResidualSplit.of(x, a, RANK, gen)
                    else:
                        tracked[name] = ResidualSplit.on_bases(x, a, *tracked_bases(x, a, tracked[name].u, tracked[name].v))
                        tracking[name].append((step, tracking_ratio(g, a, tracked[name], gen)))
            if step in args.steps:
                for name, _ in hidden:
                    plain, same, equal, k_equal = ratios(saved[(name, "g")], saved[(name, "a")], gen)
                    rows.append(f"| {step} | {name} | {plain:.3f} | {same:.3f} ({same / plain:.2f}x) "
                                f"| {k_equal} | {equal:.3f} ({equal / plain:.2f}x) |")
                    ages = [d for d in args.stale if d < len(history[name])]
                    growth = staleness(saved[(name, "g")], saved[(name, "a")], [history[name][d] for d in [0, *ages]])
                    stale_rows.append(f"| {step} | {name} | " + " | ".join(
                        f"{growth[1 + ages.index(d)]:.2f}" if d in ages else "" for d in args.stale) + " |")
            opt.step()
            if step == max(args.steps):
                break
    text = (f"# Residual sketch against the norm sketch: V_sketch / V_sgd per weight gradient\n\n"
            f"`python examples/residual_check.py`; MLP 784-{args.width}-{args.width}-{args.width}-10 trained exactly (SGD momentum 0.9, "
            f"lr {LR}, batch {BATCH}, 20,000 Fashion-MNIST images); norm sketch at p = {P} (k = {round(P * BATCH)}), "
            f"residual sketch of rank {RANK} (one power iteration) at the same k and at the k of equal GEMM FLOPs; "
            f"torch {torch.__version__}, {platform.machine()}, {datetime.date.today().isoformat()}. "
            f"Layer names are the `nn.Sequential` indices (1: 784 inputs; 3, 5: {args.width}).\n\n"
            f"| step | layer | norm, k = {round(P * BATCH)} | residual, same k | residual k at equal FLOPs "
            "| residual, equal FLOPs |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"## Bases reused across steps: residual variance at k = {round(P * BATCH)}, bases made d steps earlier, "
            "over its variance with the step's own bases\n\n"
            "| step | layer | " + " | ".join(f"d = {d}" for d in args.stale) + " |\n"
            "|---|---|" + "---|" * len(args.stale) + "\n" + "\n".join(stale_rows) + "\n\n"
            + tracking_table(tracking))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
