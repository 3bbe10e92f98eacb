"""The theory check: gradient variance against its closed form, extra epochs against the variance ratio.

    python examples/theory_check.py [--out docs/experiments] [--draws 64] [--models mlp vit gpt]

1. Per linear layer of the sweep's MLP at its initial weights, on one training batch of 256: the
   added variance of the weight gradient when ``grad="weight"`` samples batch rows, measured over
   ``--draws`` draws (``ubcompile.profile``), against its closed form (exact for the uniform sketch,
   the Poisson approximation for the norm sketch's fixed-size systematic design), for each ``p``.
2. Per sampled configuration of the sweep (``examples/sweep.py``, records in ``OUT/runs.jsonl``):
   ``r = V_sketch / V_sgd``, the added variance over the minibatch-SGD variance summed over the
   linear layers at init; the paper's trade-off, which predicts about ``1 + r`` times the steps in
   the noise-dominated regime; and the measured ratio of epochs to reach the exact run's accuracy
   at mid-training (mean over seeds, the sweep's learning rate). The prediction is for SGD; the
   GPT trains with Adam.

Writes ``OUT/theory.md``. Only ``nn.Linear`` layers are profiled: the BagNet, all convolutions, is
left out of part 2, and the ViT's patch embedding is not counted.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
from typing import Any, Optional

import torch

import sweep
import ubcompile
from experiment import loss_fn
from ubcompile.profile import Profile
from sweep_report import Record, by_label, exact_lr, mean_reached


def profile(model: str, draws: int, **options: Any) -> Profile:
    """``ubcompile.profile`` of the sweep's ``model`` at its initial weights (seed 0), on its first batch."""
    torch._dynamo.reset()
    task = sweep.task(model)
    args = sweep.parse({"model": model, "exact": True, "lr": 0.0, "seed": 0})
    torch.manual_seed(0)
    x, y = task.example
    backend = ubcompile.backend(seed=0, min_dim=args.min_dim, **options)
    return ubcompile.profile(task.build(), loss_fn, x, targets=y, draws=draws, backend=backend)


def layer_table(ps: list[float], draws: int) -> str:
    rows = ["| sketch | p | layer | measured var / |g|² | closed form / |g|² | measured / closed form |",
            "|---|---|---|---|---|---|"]
    for sketch in sweep.SKETCHES:
        for p in ps:
            prof = profile("mlp", draws, p=p, grad="weight", sketch=sketch, axis="rows")
            for lp in prof.layers:
                if lp.predicted_variance is None:
                    continue
                rows.append(f"| {sketch} | {p:g} | {lp.module} | {lp.sketch_variance / lp.grad_sq_norm:.4g} | "
                            f"{lp.predicted_variance / lp.grad_sq_norm:.4g} | "
                            f"{lp.sketch_variance / lp.predicted_variance:.3f} |")
    return "\n".join(rows) + "\n"


def mid_target(exact_runs: list[Record]) -> float:
    """Mean over seeds of the exact run's accuracy at the evaluation closest to half its epochs."""
    def mid(run: Record) -> float:
        half = run["config"]["epochs"] / 2
        return min(run["curve"], key=lambda pt: abs(pt["epoch"] - half))["acc"]
    return statistics.mean(mid(r) for r in exact_runs)


def tradeoff_table(models: list[str], records: dict[str, list[Record]], draws: int) -> str:
    rows = ["| model (optimizer) | run | r = V_sketch / V_sgd at init | predicted steps 1 + r | target acc % "
            "| measured epochs to target vs exact |", "|---|---|---|---|---|---|"]
    for model in models:
        groups = by_label(records[model], exact_lr(model))
        target = mid_target(groups["exact"])
        exact_epochs = mean_reached(groups["exact"], target, "epoch")
        name = f"{model} ({groups['exact'][0]['config']['optimizer']})"
        for grad in sweep.GRADS:
            for sketch in sweep.SKETCHES:
                for p in sweep.PS:
                    runs = groups.get(f"{grad}:{sketch} p={p:g}", [])
                    if not runs:
                        continue
                    prof = profile(model, draws, p=p, grad=grad, sketch=sketch)
                    r = sum(lp.sketch_variance for lp in prof.layers) / sum(lp.sgd_variance for lp in prof.layers)
                    epochs: Optional[float] = mean_reached(runs, target, "epoch")
                    measured = (f"{epochs / exact_epochs:.2f}" if epochs is not None
                                else f"> {runs[0]['config']['epochs'] / exact_epochs:.2f} (not reached)")
                    rows.append(f"| {name} | {grad}:{sketch} p={p:g} | {r:.3g} | {1 + r:.3g} | {target:.2f} "
                                f"| {measured} |")
                    print(rows[-1], flush=True)
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=sweep.ROOT / "docs" / "experiments")
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=["mlp", "vit", "gpt"], choices=["mlp", "vit", "gpt"])
    args = ap.parse_args()
    records: dict[str, list[Record]] = {}
    for r in sweep.load_records(args.out / "runs.jsonl"):
        records.setdefault(r["task"], []).append(r)
    text = ("## Variance per layer: measured against the closed form (MLP, grad=weight, rows)\n\n"
            + layer_table(list(sweep.PS), args.draws) + "\n## Extra epochs against the variance ratio\n\n"
            + tradeoff_table([m for m in args.models if m in records], records, args.draws))
    (args.out / "theory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
