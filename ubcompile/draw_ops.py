"""The graph ops that draw: kept indices, projections, and the controlled product of ``p="auto"``.

Compiled backward graphs call ``torch.ops.ubcompile.uniform_indices`` or
``torch.ops.ubcompile.pps_indices`` to draw the kept indices and ``projection`` for the
rank-constrained sketches; compiled forward graphs call ``gemm_drawing_rows`` for the activation
sketch, which draws a linear layer's kept input rows next to its forward product. These are pure
functions of their inputs: every random number comes from the graph's seed input (a 0-d int64
tensor, :mod:`ubcompile.passes.seed_input`) and the draw's ``site`` through the counter-based
generator of :mod:`ubcompile.sketches.counter_rng`, on the device, with no host sync. So a
replayed, recomputed (activation checkpointing) or cached graph draws what its seed says, and no
op needs a state outside the graph.

``auto_contraction``, the product whose fraction ``p="auto"`` chooses at run time, keeps its
controller's state in Python and draws from the generator its ``sampler_id`` names
(:func:`ubcompile.sampler.sampler`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .kernels import kernel
from .sampler import sampler
from .sketches.counter_rng import normal, order_and_offset, stream_key
from .sketches.lowrank import gaussian_projection, orthonormal_projection
from .sketches.norm import output_importance, pps_draw, probability_dtype
from .sketches.uniform import stratified, systematic_positions, uniform_scale


def _key(site: int, part: int) -> int:
    """The counter-generator key of ``part`` (a block of a stratified draw) of the draw ``site``:
    a distinct stream for every pair below ``2**16`` each."""
    return stream_key((site << 16) | part)


@kernel
def _pps(importance: Tensor, k: int, seed: Tensor, key: int) -> tuple[Tensor, Tensor]:
    """:func:`~ubcompile.sketches.norm.pps_draw` with its order and offset from the stream ``key``."""
    return pps_draw(importance, k, *order_and_offset(seed, key, importance.shape[0]))


@kernel
def _uniform(n: int, k: int, seed: Tensor, key: int) -> Tensor:
    """``k`` indices of ``range(n)``: a systematic sample of a random order (on ``seed``'s device),
    in that order (:func:`~ubcompile.sketches.norm.pps_draw` says why not sorted)."""
    order, offset = order_and_offset(seed, key, n)
    return order[systematic_positions(n, k, offset)]


@torch.library.custom_op("ubcompile::uniform_indices", mutates_args=())
def uniform_indices(anchor: Tensor, n: int, k: int, seed: Tensor, site: int,
                    strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` distinct indices drawn uniformly from ``range(n)`` on ``anchor``'s device (``k / strata``
    from each of ``strata`` equal blocks), and their weight ``n / k`` (0-d, ``anchor``'s dtype).

    ``anchor`` (the cotangent being sampled) fixes the dtype and orders the draw after the
    cotangent exists; ``site`` tells the draws of a graph apart.
    """
    def block_draw(block: int, k_block: int) -> tuple[Tensor]:
        return (_uniform(n // strata, k_block, seed, _key(site, block)),)

    return stratified(block_draw, n, k, strata)[0], anchor.new_full((), uniform_scale(n, k))


@uniform_indices.register_fake
def _(anchor: Tensor, n: int, k: int, seed: Tensor, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    return anchor.new_empty((k,), dtype=torch.long), anchor.new_empty(())


@torch.library.custom_op("ubcompile::pps_indices", mutates_args=())
def pps_indices(importance: Tensor, k: int, seed: Tensor, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` distinct indices drawn with probabilities ``min(1, c * importance)``, and weights ``1 / pi``
    (``k / strata`` from each of ``strata`` equal blocks, each water-filled on its own); the weights
    are float32 (float64 for a float64 ``importance``, :func:`~.sketches.norm.probability_dtype`)."""
    blocks = importance.reshape(strata, -1)

    def block_draw(block: int, k_block: int) -> tuple[Tensor, Tensor]:
        return _pps(importance if strata == 1 else blocks[block], k_block, seed, _key(site, block))

    return stratified(block_draw, importance.shape[0], k, strata)


@pps_indices.register_fake
def _(importance: Tensor, k: int, seed: Tensor, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    return (importance.new_empty((k,), dtype=torch.long),
            importance.new_empty((k,), dtype=probability_dtype(importance.dtype)))


def _projection_kernel(make: Callable[[Tensor, torch.dtype], Tensor]) -> Callable[..., Tensor]:
    @kernel
    def project(anchor: Tensor, n: int, k: int, seed: Tensor, key: int) -> Tensor:
        return make(normal(seed, key, n * k).reshape(n, k), anchor.dtype).contiguous()

    return project


_PROJECTIONS = {"lowrank": _projection_kernel(orthonormal_projection),
                "gaussian": _projection_kernel(gaussian_projection)}


@torch.library.custom_op("ubcompile::projection", mutates_args=())
def projection(anchor: Tensor, n: int, k: int, kind: str, seed: Tensor, site: int) -> Tensor:
    """An ``n x k`` random projection ``Omega`` with ``E[Omega Omega^T] = I`` (``kind``: lowrank, gaussian)."""
    return _PROJECTIONS[kind](anchor, n, k, seed, _key(site, 0))


@projection.register_fake
def _(anchor: Tensor, n: int, k: int, kind: str, seed: Tensor, site: int) -> Tensor:
    return anchor.new_empty((n, k))


@torch.library.custom_op("ubcompile::auto_contraction", mutates_args=())
def auto_contraction(x: Tensor, y: Tensor, sampler_id: int, site: int, samples: int) -> Tensor:
    """``x @ y`` estimated at the keep fraction the sampler's controller chose for ``site`` (rows of
    ``y``, the rows of ``samples`` samples)."""
    owner = sampler(sampler_id)
    if owner.auto is None:
        raise RuntimeError(f"ubcompile sampler {sampler_id} has no p='auto' controller")
    return owner.auto.contraction(x, y, site, owner.generator(x.device), samples)


@auto_contraction.register_fake
def _(x: Tensor, y: Tensor, sampler_id: int, site: int, samples: int) -> Tensor:
    return x.new_empty((x.shape[0], y.shape[1]))


@kernel
def _row_norms(x: Tensor) -> Tensor:
    return output_importance(x, 0)


@torch.library.custom_op("ubcompile::gemm_drawing_rows", mutates_args=())
def gemm_drawing_rows(x: Tensor, k: int, seed: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` rows of a linear layer's input ``x`` drawn in the forward for its weight gradient.

    Returns the kept rows ``x[idx]``, ``idx`` and the weights ``1 / pi`` (float32, or float64 for
    float64 ``x``); ``pi_j = min(1, c ||x_j||)`` (the systematic PPS sample of the row norms). The
    layer's product stays a plain ``mm``/``addmm`` next to it (:mod:`ubcompile.passes.forward_rows`);
    a checkpoint that recomputes the draw gets the same rows, the draw being a function of ``seed``.
    """
    idx, weights = _pps(_row_norms(x), k, seed, _key(site, 0))
    return x[idx], idx, weights


@gemm_drawing_rows.register_fake
def _(x: Tensor, k: int, seed: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty((k, x.shape[1])), x.new_empty((k,), dtype=torch.long),
            x.new_empty((k,), dtype=probability_dtype(x.dtype)))
