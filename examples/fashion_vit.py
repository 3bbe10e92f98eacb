"""Fashion-MNIST Vision Transformer (7x7 patches: 16 tokens and a class token; attention written
out as two batched matmuls; see ``examples/models.py``) with exact or sampled gradients.

    python examples/fashion_vit.py [--exact | --p 0.25 --grad weight --sketch norm] [--epochs 3]
        [--lr 0.05] [--seed 0] [--device cpu] [--dim 64] [--depth 2] [--limit-train N] [--json out.json]

SGD with momentum 0.9, batch 128. The common options are in ``examples/experiment.py``.
"""

from __future__ import annotations

import argparse

import fashion_data
from experiment import Task, main
from models import ViT

LR, EPOCHS, BATCH, OPTIMIZER = 0.05, 3, 128, "sgd"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    fashion_data.add_arguments(ap, BATCH)
    ap.add_argument("--dim", type=int, default=64, help="token width (two heads)")
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks")


def build_task(args: argparse.Namespace) -> Task:
    def build() -> ViT:
        return ViT(in_channels=1, image=28, patch=7, dim=args.dim, heads=2, depth=args.depth)

    return fashion_data.fashion_task("vit", build, args, images=True)


if __name__ == "__main__":
    main(build_task, __doc__, LR, EPOCHS, OPTIMIZER, add_arguments)
