"""FLOP counts of GEMM nodes, from their fake-tensor shapes (symbolic sizes at example values)."""

from __future__ import annotations

import math

import torch
import torch.fx

from .._torch_private import size_hint

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
    return 2 * math.prod(size_hint(d) for d in xs) * size_hint(ys[-1])
