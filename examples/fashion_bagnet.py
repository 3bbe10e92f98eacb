"""Fashion-MNIST BagNet-style CNN (3x3, 1x1, strided 3x3, 1x1 convolutions, logits averaged over
patches; see ``examples/models.py``) with exact or sampled gradients.

    python examples/fashion_bagnet.py [--exact | --p 0.25 --grad weight --sketch norm] [--epochs 3]
        [--lr 0.01] [--seed 0] [--device cpu] [--width 32] [--limit-train N] [--json out.json]

Adam, lr 0.01, batch 128. Channels: ``width`` after the first convolution, ``2 * width``
after the others. The common options are in ``examples/experiment.py``.
"""

from __future__ import annotations

import argparse

import fashion_data
from experiment import Task, main
from models import BagNet

LR, EPOCHS, BATCH, OPTIMIZER = 0.01, 3, 128, "adam"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    fashion_data.add_arguments(ap, BATCH)
    ap.add_argument("--width", type=int, default=32, help="channels of the first convolution")


def build_task(args: argparse.Namespace) -> Task:
    return fashion_data.fashion_task("bagnet", lambda: BagNet(in_channels=1, width=args.width), args, images=True)


if __name__ == "__main__":
    main(build_task, __doc__, LR, EPOCHS, OPTIMIZER, add_arguments)
