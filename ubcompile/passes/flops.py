"""FLOP counts of GEMM nodes, from their fake-tensor shapes."""

from __future__ import annotations

import math

import torch
import torch.fx

aten = torch.ops.aten


def gemm_flops(node: torch.fx.Node) -> int:
    """``2 * M * K * N`` (times the batch for bmm) of an mm, addmm or bmm node; 0 for anything else."""
    if node.target is aten.addmm.default:
        x, y = node.args[1:3]
    elif node.target in (aten.mm.default, aten.bmm.default):
        x, y = node.args[:2]
    else:
        return 0
    xs, ys = x.meta["val"].shape, y.meta["val"].shape
    return 2 * math.prod(int(d) for d in xs) * int(ys[-1])
