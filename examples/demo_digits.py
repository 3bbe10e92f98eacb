"""Train a small MLP on scikit-learn's digits with exact and sampled backward GEMMs.

Four runs from the same initial weights and the same batch order, in one process:
``torch.compile`` with Inductor (exact gradients), then ``ubcompile.backend(p=P, grad=G, sketch=S)``
for the default (weight-gradient rows, norm sketch), ``grad="both"`` with the norm sketch, and
``grad="both"`` with the uniform sketch (which diverges at the default learning rate). Each reports test accuracy, backward GEMM FLOPs
relative to exact, and the median training step time. The digits' products (batch 128, width 256)
are too small for sampling to pay on a CPU, so the backend's cost rule would keep every one exact:
the demo turns it off (``min_speedup=0``) to show the estimators' accuracy.

    python examples/demo_digits.py [--epochs 30] [--lr 0.05] [--p 0.25] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tabulate import tabulate

import ubcompile

BATCH = 128
N_TRAIN = 1437
WARMUP_STEPS = 3  # the first steps include compilation; their times are skipped

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_data() -> Data:
    """Digits, split 1437/360 by a permutation seeded with 0, standardised with train statistics."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:N_TRAIN], perm[N_TRAIN:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)  # some pixels are constant
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # every run starts from the same weights
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = 100.0 * (model(x).argmax(1) == y).sum().item() / len(y)
    model.train()
    return acc


def train(backend: Any, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Train one compiled model; return its accuracy, median step time and status."""
    torch._dynamo.reset()
    x_tr, y_tr, x_te, y_te = data
    model = make_model(args.seed)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)  # same batch order in every run
    times: list[float] = []
    step, status = 0, "ok"
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(perm) - BATCH + 1, BATCH):  # full batches only: static shapes
            idx = perm[i:i + BATCH]
            t0 = time.perf_counter()
            loss = F.cross_entropy(compiled(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            step += 1
            if not math.isfinite(loss.item()):
                status = f"diverged at step {step}"
                break
        if status != "ok":
            break
    acc: Optional[float] = accuracy(compiled, x_te, y_te) if status == "ok" else None
    steady = times[WARMUP_STEPS:] or times
    return {"test_acc": acc, "median_step_ms": statistics.median(steady) * 1e3, "status": status}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--p", type=float, default=0.25, help="keep fraction of the sampled GEMMs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    data = load_data()
    results: list[dict[str, Any]] = []
    runs: list[tuple[str, Optional[str], str]] = [
        ("exact (inductor)", None, "-"), ("ubcompile", "weight", "norm"), ("ubcompile", "both", "norm"),
        ("ubcompile", "both", "uniform")]
    for name, grad, sketch in runs:
        if grad is None:
            res, ratio, p = train("inductor", data, args), 1.0, None
        else:
            b = ubcompile.backend(p=args.p, grad=grad, sketch=sketch, min_speedup=0)
            res, p = train(b, data, args), args.p
            report = b.report()
            ratio = report.flop_ratio
            print(f"== ubcompile grad={grad!r} sketch={sketch!r} p={args.p} ==\n{report}\n")
        results.append({"run": name, "grad": grad, "sketch": sketch, "p": p, "flop_ratio": ratio, **res})

    rows = [[r["run"], r["grad"] or "-", r["sketch"], "-" if r["p"] is None else r["p"],
             "-" if r["test_acc"] is None else f"{r['test_acc']:.1f}",
             f"{r['flop_ratio']:.3f}", f"{r['median_step_ms']:.2f}", r["status"]] for r in results]
    headers = ["run", "grad", "sketch", "p", "test acc %", "bwd GEMM FLOPs vs exact", "median step ms", "status"]
    print(tabulate(rows, headers=headers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
