"""Added gradient variance of each sketch, grad mode and p, relative to minibatch-SGD noise.

On the Fashion-MNIST MLP 784-1024x3-10 at its initial weights (seed 0), one batch of 256 training
images: ``ubcompile.profile`` measures, per linear layer, the sketch's variance of the weight
gradient over ``--draws`` draws and the SGD variance of the exact gradient at batch 256. The table
sums both over the layers and gives the backward GEMM FLOPs ratio of the same backend.

    python benchmarks/variance_table.py [--p 0.5 0.25 0.1] [--draws 32] [--sketches ...] [--grads ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate

import ubcompile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from fashion_data import load_fashion_mnist, normalize  # noqa: E402
from models import mlp  # noqa: E402

MODES = [("weight", "rows"), ("weight", "features"), ("input", "features"), ("both", "features")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--sketches", nargs="+", default=list(ubcompile.SKETCHES), choices=ubcompile.SKETCHES)
    parser.add_argument("--grads", nargs="+", default=sorted({grad for grad, _ in MODES}), choices=ubcompile.GRAD_MODES)
    parser.add_argument("--json")
    args = parser.parse_args()
    x_train, y_train, _, _ = load_fashion_mnist()
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:256]
    x, y = normalize(x_train[perm]), y_train[perm]
    rows = []
    for sketch in args.sketches:
        for grad, axis in [(grad, axis) for grad, axis in MODES if grad in args.grads]:
            if sketch == "activation" and (grad, axis) != ("weight", "rows"):
                continue  # it draws weight-gradient rows in the forward only
            for p in args.p:
                torch._dynamo.reset()
                backend = ubcompile.backend(p=p, grad=grad, sketch=sketch, axis=axis, seed=0)
                torch.manual_seed(0)
                prof = ubcompile.profile(mlp([784, 1024, 1024, 1024, 10]), F.cross_entropy, x, targets=y,
                                         draws=args.draws, backend=backend)
                sketch_var = sum(lp.sketch_variance for lp in prof.layers)
                sgd_var = sum(lp.sgd_variance for lp in prof.layers)
                worst = max(prof.layers, key=lambda lp: lp.variance_ratio)
                rows.append({"sketch": sketch, "grad": grad, "axis": axis, "p": p,
                             "variance_vs_sgd": sketch_var / sgd_var,
                             "worst_layer": worst.module, "worst_layer_ratio": worst.variance_ratio,
                             "bwd_flop_ratio": backend.report().flop_ratio})
                print(rows[-1], flush=True)
    headers = ["sketch", "grad", "axis", "p", "sketch var / SGD var (all layers)", "worst layer",
               "bwd GEMM FLOPs / exact"]
    print(tabulate([[r["sketch"], r["grad"], r["axis"], r["p"], f"{r['variance_vs_sgd']:.3g}",
                     f"{r['worst_layer']}: {r['worst_layer_ratio']:.3g}", f"{r['bwd_flop_ratio']:.3f}"]
                    for r in rows], headers=headers, tablefmt="github"))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
