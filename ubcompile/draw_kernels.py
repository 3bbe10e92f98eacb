"""The draws' bodies, compiled once for all sizes (:func:`ubcompile.kernels.kernel`): pure
functions of a seed tensor and a stream key (:mod:`ubcompile.sketches.counter_rng`), called by
the graph ops of :mod:`ubcompile.draw_ops` and by the ``p="auto"`` controller."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .kernels import kernel
from .sketches.counter_rng import normal, order_and_offset, stream_key
from .sketches.lowrank import gaussian_projection, orthonormal_projection
from .sketches.norm import output_importance, pps_draw
from .sketches.uniform import systematic_positions


def stream_of(site: int, part: int) -> int:
    """The counter-generator key of ``part`` (a block of a stratified draw) of the draw ``site``:
    a distinct stream for every pair below ``2**16`` each."""
    return stream_key((site << 16) | part)


@kernel
def pps(importance: Tensor, k: int, seed: Tensor, key: int) -> tuple[Tensor, Tensor]:
    """:func:`~ubcompile.sketches.norm.pps_draw` with its order and offset from the stream ``key``."""
    return pps_draw(importance, k, *order_and_offset(seed, key, importance.shape[0]))


@kernel
def uniform(n: int, k: int, seed: Tensor, key: int) -> Tensor:
    """``k`` indices of ``range(n)``: a systematic sample of a random order (on ``seed``'s device),
    in that order (:func:`~ubcompile.sketches.norm.pps_draw` says why not sorted)."""
    order, offset = order_and_offset(seed, key, n)
    return order[systematic_positions(n, k, offset)]


def _projection(make: Callable[[Tensor, torch.dtype], Tensor]) -> Callable[..., Tensor]:
    @kernel
    def project(anchor: Tensor, n: int, k: int, seed: Tensor, key: int) -> Tensor:
        return make(normal(seed, key, n * k).reshape(n, k), anchor.dtype).contiguous()

    return project


PROJECTIONS = {"lowrank": _projection(orthonormal_projection), "gaussian": _projection(gaussian_projection)}
"""An ``n x k`` projection ``Omega`` with ``E[Omega Omega^T] = I``, per kind."""


@kernel
def row_norms(x: Tensor) -> Tensor:
    """The norm of each row of ``x``: the importances of the activation sketch's rows."""
    return output_importance(x, 0)


@kernel
def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]``: the kept rows, gathered by a compiled kernel."""
    return x[idx]
