"""Fashion-MNIST from its idx files, a full-batch iterator with its own generator, and the examples' task.

The idx files come from the Debian package (``sudo apt-get install dataset-fashion-mnist``, which
puts the four gzipped files in ``/usr/share/datasets/fashion-mnist/``) or from any directory
holding them, gzipped or not.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from experiment import Task, chunked_accuracy

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist/"
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# The usual Fashion-MNIST pixel statistics (training set, pixels scaled to [0, 1]).
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {directory}: install with "
        "`sudo apt-get install dataset-fashion-mnist` or pass a directory holding the four idx files"
    )


def read_idx(path: Path) -> np.ndarray:
    """An idx file (``.gz`` or raw) of unsigned bytes, as a uint8 array of the shape it declares."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Optional[str] = None) -> Split:
    """``(x_train, y_train, x_test, y_test)``: images float32 ``[n, 784]`` in [0, 1], labels int64.

    ``root``, else ``$FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist/``.
    Not normalised: see :func:`normalize`.
    """
    directory = Path(root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_DIR)
    arrays = {key: read_idx(_find(directory, name)) for key, name in FILES.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return images(arrays["x_train"]), labels(arrays["y_train"]), images(arrays["x_test"]), labels(arrays["y_test"])


def normalize(x: torch.Tensor, mean: float = FASHION_MEAN, std: float = FASHION_STD) -> torch.Tensor:
    """``(x - mean) / std`` with the standard Fashion-MNIST statistics: the same for every run."""
    return (x - mean) / std


def full_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled epoch over ``range(n)``, full batches only (static shapes).

    The order comes from ``generator`` (seed it per run), never from torch's global generator.
    """
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n - batch_size + 1, batch_size):
        yield perm[i:i + batch_size]


def add_arguments(ap: argparse.ArgumentParser, batch: int) -> None:
    """The Fashion-MNIST examples' own options."""
    ap.add_argument("--data-dir", help="directory of the idx files (default: $FASHION_MNIST_DIR or the Debian one)")
    ap.add_argument("--limit-train", type=int, metavar="N", help="train on the first N images only")
    ap.add_argument("--limit-test", type=int, metavar="N", help="test on the first N images only")
    ap.add_argument("--batch", type=int, default=batch)


EVAL_CHUNK = 1000


def fashion_task(name: str, build: Callable[[], nn.Module], args: argparse.Namespace, images: bool) -> Task:
    """Classify Fashion-MNIST, normalised pixels as ``[n, 784]`` rows or ``[n, 1, 28, 28]`` images
    (``images``), on ``args.device``; the accuracy on the 10,000 test images (or the first
    ``--limit-test``)."""
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data_dir)
    if args.limit_train is not None:
        x_tr, y_tr = x_tr[:args.limit_train], y_tr[:args.limit_train]
    if args.limit_test is not None:
        x_te, y_te = x_te[:args.limit_test], y_te[:args.limit_test]
    shape = (-1, 1, 28, 28) if images else (-1, 784)
    x_tr, x_te = (normalize(x).view(shape).to(args.device) for x in (x_tr, x_te))
    y_tr, y_te = y_tr.to(args.device), y_te.to(args.device)
    chunk = math.gcd(len(x_te), EVAL_CHUNK)

    def batches(generator: torch.Generator):
        return ((x_tr[idx], y_tr[idx]) for idx in full_batches(len(x_tr), args.batch, generator))

    return Task(name=name, build=build, batches=batches, steps_per_epoch=len(x_tr) // args.batch,
                evaluate=lambda model: chunked_accuracy(model, x_te, y_te, chunk),
                example=(x_tr[:args.batch], y_tr[:args.batch]))
