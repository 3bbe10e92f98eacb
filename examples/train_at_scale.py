"""The large-model recipe with sampled gradients: torchtitan's per-block compile, FSDP2, checkpointing.

    torchrun --standalone --nproc-per-node 2 examples/train_at_scale.py

Each block is checkpointed, compiled with the ubcompile backend and sharded with ``fully_shard``,
then the root is sharded; the ranks see different batches and all-reduce (reduce-scatter) their
sampled gradients, each rank drawing its own rows. Runs on CPU (gloo) or one GPU per rank (nccl).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

import ubcompile


class Block(nn.Module):
    """A pre-norm residual MLP block, checkpointed: its activations are recomputed in the backward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, use_reentrant=False)


class Model(nn.Module):
    def __init__(self, width: int, depth: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def shard(model: Model, backend: ubcompile.Backend) -> Model:
    """torchtitan's recipe: compile each block, shard each block, then shard the root."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend=backend)
        fully_shard(model.blocks[i])
    fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="per rank")
    parser.add_argument("--p", type=float, default=0.25)
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--min-speedup", type=float, default=1.0,
                        help="the backend's cost rule; 0 samples every product (on a CPU the default sizes are too "
                             "small for sampling to pay)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    backend = ubcompile.backend(p=args.p, compiler=args.compiler, min_speedup=args.min_speedup)
    model = shard(Model(args.width, args.depth, classes=10).to(device), backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    teacher = torch.randn(args.width, 10, generator=torch.Generator().manual_seed(1)).to(device)
    data = torch.Generator().manual_seed(2 + rank)  # each rank its own batches
    for step in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=data).to(device)
        loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    if rank == 0:  # the blocks share one compiled graph: its GEMMs are listed once
        print(backend.report())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
