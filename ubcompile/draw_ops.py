"""The graph ops that draw: kept indices, projections, and the controlled product of ``p="auto"``.

Compiled backward graphs call ``torch.ops.ubcompile.uniform_indices`` or
``torch.ops.ubcompile.pps_indices`` to draw the kept indices, ``projection`` for the rank-constrained
sketches, and ``auto_contraction`` for the products whose fraction ``p="auto"`` chooses at run time;
compiled forward graphs call ``gemm_drawing_rows`` for the activation sketch, which draws a linear
layer's kept input rows next to its forward product. Each draws from the generator its
``sampler_id`` names (:func:`ubcompile.sampler.generator`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampler import generator, sampler
from .sketches.lowrank import gaussian_sketch, orthonormal_sketch
from .sketches.norm import output_importance, pps_sample, probability_dtype
from .sketches.uniform import stratified, uniform_scale, uniform_subset


@torch.library.custom_op("ubcompile::uniform_indices", mutates_args=())
def uniform_indices(anchor: Tensor, n: int, k: int, sampler_id: int, site: int,
                    strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` sorted indices drawn uniformly from ``range(n)`` on ``anchor``'s device (``k / strata``
    from each of ``strata`` equal blocks), and their weight ``n / k`` (0-d, ``anchor``'s dtype).

    ``anchor`` (the cotangent being sampled) fixes the device and orders the draw after the
    cotangent exists; ``site`` tells the draws of different layers apart so no pass merges them.
    """
    gen = generator(sampler_id, anchor.device)
    idx = stratified(lambda _, k_block: (uniform_subset(n // strata, k_block, gen, anchor.device),), n, k, strata)[0]
    return idx, anchor.new_full((), uniform_scale(n, k))


@uniform_indices.register_fake
def _(anchor: Tensor, n: int, k: int, sampler_id: int, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    return anchor.new_empty((k,), dtype=torch.long), anchor.new_empty(())


@torch.library.custom_op("ubcompile::pps_indices", mutates_args=())
def pps_indices(importance: Tensor, k: int, sampler_id: int, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` sorted indices drawn with probabilities ``min(1, c * importance)``, and weights ``1 / pi``
    (``k / strata`` from each of ``strata`` equal blocks, each water-filled on its own); the weights
    are float32 (float64 for a float64 ``importance``, :func:`~.sketches.norm.probability_dtype`)."""
    gen = generator(sampler_id, importance.device)
    blocks = importance.reshape(strata, -1)
    return stratified(lambda s, k_block: pps_sample(blocks[s], k_block, gen), importance.shape[0], k, strata)


@pps_indices.register_fake
def _(importance: Tensor, k: int, sampler_id: int, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    return (importance.new_empty((k,), dtype=torch.long),
            importance.new_empty((k,), dtype=probability_dtype(importance.dtype)))


_PROJECTIONS = {"lowrank": orthonormal_sketch, "gaussian": gaussian_sketch}


@torch.library.custom_op("ubcompile::projection", mutates_args=())
def projection(anchor: Tensor, n: int, k: int, kind: str, sampler_id: int, site: int) -> Tensor:
    """An ``n x k`` random projection ``Omega`` with ``E[Omega Omega^T] = I`` (``kind``: lowrank, gaussian)."""
    gen = generator(sampler_id, anchor.device)
    return _PROJECTIONS[kind](n, k, gen, anchor.device, anchor.dtype).contiguous()


@projection.register_fake
def _(anchor: Tensor, n: int, k: int, kind: str, sampler_id: int, site: int) -> Tensor:
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


@torch.library.custom_op("ubcompile::gemm_drawing_rows", mutates_args=())
def gemm_drawing_rows(x: Tensor, k: int, sampler_id: int, site: int) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` rows of a linear layer's input ``x`` drawn in the forward for its weight gradient.

    Returns the kept rows ``x[idx]``, ``idx`` and the weights ``1 / pi`` (float32, or float64 for
    float64 ``x``); ``pi_j = min(1, c ||x_j||)`` (:func:`pps_sample` of the row norms). The layer's
    product stays a plain ``mm``/``addmm`` next to it, so a checkpoint that recomputes the product
    does not draw again (:mod:`ubcompile.passes.forward_rows`).
    """
    idx, weights = pps_sample(output_importance(x, 0), k, generator(sampler_id, x.device))
    return x[idx], idx, weights


@gemm_drawing_rows.register_fake
def _(x: Tensor, k: int, sampler_id: int, site: int) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty((k, x.shape[1])), x.new_empty((k,), dtype=torch.long),
            x.new_empty((k,), dtype=probability_dtype(x.dtype)))
