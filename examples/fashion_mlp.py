"""Fashion-MNIST MLP 784-1024-1024-1024-10 with exact and sampled backward GEMMs (issue 4).

Every run starts from the same weights (``torch.manual_seed(seed)`` just before the model is
built) and sees the same batches (a ``torch.Generator`` seeded with ``seed``); SGD, momentum 0.9,
batch 256, full batches only. A mode is ``exact`` (``torch.compile`` with Inductor) or
``GRAD:SKETCH:AXIS`` (``ubcompile.backend(p=P, grad=GRAD, sketch=SKETCH, axis=AXIS, seed=seed)``;
``sketch``/``axis`` are passed only when they differ from uniform / the grad mode's default axis).
Per run: test accuracy after each epoch, backward GEMM FLOPs ratio, training time, median step
time, and the relative error of the first layer's weight gradient at init (mean of 5 draws).

    python examples/fashion_mlp.py [--mode exact --mode weight:uniform:rows ...] [--epochs 6]
        [--lr 0.05] [--p 0.25] [--seed 0] [--limit-train N] [--data-dir DIR] [--json PATH]

Data: ``sudo apt-get install dataset-fashion-mnist`` (see ``examples/fashion_data.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import traceback
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import ubcompile
from fashion_data import Split, full_batches, load_fashion_mnist, normalize

BATCH = 256
WIDTH = 1024
DEFAULT_MODES = ["exact", "weight:uniform:rows", "both:uniform:features"]
DEFAULT_AXIS = {"weight": "rows", "both": "features", "input": "features"}
WARMUP_STEPS = 3  # the first steps may include compilation; median step time skips them
REL_ERR_DRAWS = 5


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # every run starts from the same weights
    return nn.Sequential(
        nn.Linear(784, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, 10),
    )


def make_backend(mode: str, p: float, seed: int) -> Any:
    """``"inductor"`` for ``exact``, else a ubcompile backend for ``GRAD:SKETCH:AXIS``."""
    if mode == "exact":
        return "inductor"
    grad, sketch, axis = mode.split(":")
    kwargs: dict[str, Any] = {}
    if sketch != "uniform":
        kwargs["sketch"] = sketch
    if axis != DEFAULT_AXIS.get(grad):
        kwargs["axis"] = axis
    return ubcompile.backend(p=p, grad=grad, seed=seed, **kwargs)


def accuracy(compiled: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    # No dropout or batch norm: train/eval mode is the same function, and not switching it
    # spares a recompile.
    with torch.no_grad():
        return 100.0 * (compiled(x).argmax(1) == y).sum().item() / len(y)


def first_layer_grad_rel_err(model: nn.Sequential, compiled: nn.Module, x: torch.Tensor,
                             y: torch.Tensor, draws: int = REL_ERR_DRAWS) -> float:
    """Mean over ``draws`` of ||g_compiled - g_eager|| / ||g_eager|| for layer 0's weight gradient."""
    weight = model[0].weight
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    g_exact = weight.grad.clone()
    errs = []
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        errs.append(((weight.grad - g_exact).norm() / g_exact.norm()).item())
    model.zero_grad(set_to_none=True)
    return statistics.mean(errs)


def train(mode: str, data: Split, args: argparse.Namespace) -> dict[str, Any]:
    """One run: rel. gradient error at init, then training with per-epoch test accuracy."""
    t_run = time.perf_counter()
    torch._dynamo.reset()
    x_tr, y_tr, x_te, y_te = data
    backend = make_backend(mode, args.p, args.seed)
    model = make_model(args.seed)
    compiled = torch.compile(model, backend=backend)
    first = next(full_batches(len(x_tr), BATCH, torch.Generator().manual_seed(args.seed)))
    rel_err = first_layer_grad_rel_err(model, compiled, x_tr[first], y_tr[first])  # compiles here

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)  # same batch order in every run
    times: list[float] = []
    epoch_acc: list[float] = []
    status = "ok"
    for _ in range(args.epochs):
        for idx in full_batches(len(x_tr), BATCH, gen):
            t0 = time.perf_counter()
            loss = F.cross_entropy(compiled(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            finite = math.isfinite(loss.item())
            times.append(time.perf_counter() - t0)
            if not finite:
                status = f"diverged at step {len(times)}"
                break
        if status != "ok":
            break
        epoch_acc.append(accuracy(compiled, x_te, y_te))
    steady = times[WARMUP_STEPS:] or times
    return {
        "mode": mode, "p": None if mode == "exact" else args.p,
        "final_test_acc": epoch_acc[-1] if status == "ok" and epoch_acc else None,
        "epoch_test_acc": epoch_acc,
        "flop_ratio": 1.0 if mode == "exact" else backend.report().flop_ratio,
        "rel_err_init": rel_err, "steps": len(times),
        "train_time_s": sum(times), "median_step_ms": statistics.median(steady) * 1e3 if steady else None,
        "run_wall_s": time.perf_counter() - t_run, "status": status,
    }


def parse_mode(text: str) -> str:
    if text != "exact" and (text.count(":") != 2 or not all(text.split(":"))):
        raise argparse.ArgumentTypeError(f"mode must be 'exact' or GRAD:SKETCH:AXIS, got {text!r}")
    return text


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", action="append", type=parse_mode, dest="modes",
                    help=f"exact or GRAD:SKETCH:AXIS, repeatable (default: {' '.join(DEFAULT_MODES)})")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--p", type=float, default=0.25, help="keep fraction of the sampled GEMMs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batch order, sampler")
    ap.add_argument("--limit-train", type=int, metavar="N", help="train on the first N samples only")
    ap.add_argument("--data-dir", help="directory of the idx files (default: $FASHION_MNIST_DIR or the Debian one)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    args = ap.parse_args()
    args.modes = args.modes or list(DEFAULT_MODES)
    return args


def load_data(args: argparse.Namespace) -> Split:
    """Pixels normalised with the standard Fashion-MNIST mean/std; optionally fewer train samples."""
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_dir)
    if args.limit_train is not None:
        x_tr, y_tr = x_tr[:args.limit_train], y_tr[:args.limit_train]
    return normalize(x_tr), y_tr, normalize(x_te), y_te


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    args = parse_args()
    data = load_data(args)
    results: list[dict[str, Any]] = []
    for mode in args.modes:
        try:
            res = train(mode, data, args)
        except Exception as exc:  # a failing mode is reported; the other modes still run
            traceback.print_exc()
            res = {"mode": mode, "final_test_acc": None, "epoch_test_acc": [], "flop_ratio": None,
                   "rel_err_init": None, "train_time_s": None, "median_step_ms": None, "run_wall_s": None,
                   "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"}
        print(f"{mode}: acc per epoch {[round(a, 2) for a in res['epoch_test_acc']]}, "
              f"{res['status']}, run wall {fmt(res['run_wall_s'], '.1f')} s", flush=True)
        results.append(res)
        if args.json:  # rewritten after every run, so a long sweep keeps what it has
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)
    rows = [[r["mode"], fmt(r["final_test_acc"], ".2f"), fmt(r["flop_ratio"], ".3f"), fmt(r["rel_err_init"], ".3g"),
             fmt(r["train_time_s"], ".1f"), fmt(r["median_step_ms"], ".1f"), fmt(r["run_wall_s"], ".1f"), r["status"]]
            for r in results]
    headers = ["mode", "final test acc %", "bwd GEMM FLOPs vs exact", "rel err at init",
               "train time s", "median step ms", "run wall s", "status"]
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
