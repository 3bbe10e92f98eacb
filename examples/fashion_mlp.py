"""Fashion-MNIST MLP 784-W-W-W-10 (W = --width, default 1024) with exact or sampled gradients.

    python examples/fashion_mlp.py [--exact | --p 0.25 --grad weight --sketch norm] [--epochs 6]
        [--lr 0.05] [--seed 0] [--device cpu] [--width 1024] [--limit-train N] [--json out.json]

SGD with momentum 0.9, batch 256. Data: ``sudo apt-get install dataset-fashion-mnist`` (see
``examples/fashion_data.py``). The common options are in ``examples/experiment.py``.
"""

from __future__ import annotations

import argparse

import fashion_data
from experiment import Task, main
from models import mlp

LR, EPOCHS, BATCH, OPTIMIZER = 0.05, 6, 256, "sgd"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    fashion_data.add_arguments(ap, BATCH)
    ap.add_argument("--width", type=int, default=1024, help="width of the three hidden layers")


def build_task(args: argparse.Namespace) -> Task:
    return fashion_data.fashion_task("mlp", lambda: mlp([784] + [args.width] * 3 + [10]), args, images=False)


if __name__ == "__main__":
    main(build_task, __doc__, LR, EPOCHS, OPTIMIZER, add_arguments)
