"""The draws' bodies, compiled once for all sizes (:func:`ubcompile.kernels.kernel`): pure
functions of a seed tensor and a stream key (:mod:`ubcompile.sketches.counter_rng`), called by
the graph ops of :mod:`ubcompile.draw_ops`, by ``sampled_gemm`` (:mod:`ubcompile.estimator_ops`,
which traces them into its own compiled body) and by the ``p="auto"`` controller."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .kernels import kernel
from .sketches.counter_rng import normal, order_and_offset, stream_key
from .sketches.lowrank import gaussian_projection, orthonormal_projection
from .sketches.norm import output_importance, pps_draw, probability_dtype
from .sketches.uniform import stratified, systematic_positions, uniform_scale


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


def uniform_indices(anchor: Tensor, n: int, k: int, seed: Tensor, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` distinct indices drawn uniformly from ``range(n)`` on ``anchor``'s device (``k / strata``
    from each of ``strata`` equal blocks), and their weight ``n / k`` (0-d, at least float32:
    :func:`~.sketches.norm.probability_dtype`; ``100 / 7`` in bf16 would be 0.2% too large).

    ``anchor`` (the cotangent being sampled) fixes the device and dtype; ``site`` tells the draws
    of a graph apart.
    """
    def block_draw(block: int, k_block: int) -> tuple[Tensor]:
        return (uniform(n // strata, k_block, seed, stream_of(site, block)),)

    return stratified(block_draw, n, k, strata)[0], uniform_weight(anchor, n, k)


def uniform_weight(anchor: Tensor, n: int, k: int) -> Tensor:
    """The uniform sketch's weight ``n / k``, 0-d, in :func:`~.sketches.norm.probability_dtype` of ``anchor``."""
    return anchor.new_full((), uniform_scale(n, k), dtype=probability_dtype(anchor.dtype))


def pps_indices(importance: Tensor, k: int, seed: Tensor, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` distinct indices drawn with probabilities ``min(1, c * importance)``, and weights ``1 / pi``
    (``k / strata`` from each of ``strata`` equal blocks, each water-filled on its own); the weights
    are float32 (float64 for a float64 ``importance``, :func:`~.sketches.norm.probability_dtype`)."""
    blocks = importance.reshape(strata, -1)

    def block_draw(block: int, k_block: int) -> tuple[Tensor, Tensor]:
        return pps(importance if strata == 1 else blocks[block], k_block, seed, stream_of(site, block))

    return stratified(block_draw, importance.shape[0], k, strata)
