"""The diagonal-sketch estimators of GEMMs and convolutions as opaque graph ops.

The pass inserts one op per sampled product, which computes the importances, draws from the
graph's seed and computes the estimate: ``ubcompile::sampled_gemm`` for a GEMM,
``sampled_conv_backward`` for a convolution. A product that reuses another's draw (a layer's second
gradient under ``grad="both"``, or a projection's) calls ``sketched_gemm`` or
``sketched_conv_backward`` on it.
Inductor calls them like it calls ``mm`` (an extern kernel on the tensors as they are, views
included): traced as ATen nodes, their gathers, scales and scatters fused into different C++
kernels in every layer, which on CPU made the first step's compile 1.3-1.8x exact's
(benchmarks/RESULTS.md, "Compile time"). Each runs the pure functions of :mod:`ubcompile.sketches`:
``sampled_gemm``'s body compiled whole, once for all sizes (:func:`ubcompile.kernels.kernel`), the
others eagerly (their gathers and GEMMs, or ATen's convolution backward, gain nothing from Inductor).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import draw_kernels
from .kernels import kernel
from .sketches.axis import Diagonal
from .sketches.conv import SKETCHED_VJPS, ConvGeometry, conv_importance
from .sketches.matmul import sketched_matmul
from .sketches.norm import contraction_importance, output_term_norms, probability_dtype

CONTRACTED = -1
"""``out_dim`` of a sketch on the axis the product sums over (``x S y``)."""


def sampled_size(x: Tensor, y: Tensor, out_dim: int) -> int:
    """Length of the axis of ``x @ y`` that ``out_dim`` names (``CONTRACTED``: the inner one)."""
    return {CONTRACTED: x.shape[-1], 0: x.shape[-2], 1: y.shape[-1]}[out_dim]


def gemm_importances(x: Tensor, y: Tensor, out_dim: int, shared: Sequence[Tensor] = (),
                     shared_dims: Sequence[int] = ()) -> Tensor:
    """Norm of the part of ``x @ y`` each index of the sampled axis carries: the term norms
    ``||x[:, j]|| ||y[j, :]||`` of a contracted axis, the output row (column) norms of ``x`` (``y``)
    along output dim ``out_dim``. One read of each operand whose norms it needs.

    A draw ``shared`` with other products of the same cotangent (``grad="both"``: their operands
    as pairs ``x_2, y_2, ...`` and their ``out_dim``s) is one sketch for all of them: the sum of
    their variances, ``sum_j (1 / pi_j - 1) sum_p ||t_pj||^2``, is minimal at ``pi_j`` proportional
    to ``sqrt(sum_p ||t_pj||^2)`` (capped), which is positive wherever any product's part is
    nonzero. Drawn from one product's norms alone, a part that is zero there but not in the other
    (the input gradient of a zero weight row) is never drawn, and the other product is biased.
    Output parts enter through their Cauchy-Schwarz bound ``||x[j, :]|| ||y||_F``
    (:func:`~.sketches.norm.output_term_norms`).
    """
    if not shared:
        return _importance(x, y, out_dim, scaled=False)
    parts = [_importance(a, b, d, scaled=True) for a, b, d in zip((x, *shared[::2]), (y, *shared[1::2]),
                                                                   (out_dim, *shared_dims))]
    return torch.stack(parts).square().sum(0).sqrt()


def _importance(x: Tensor, y: Tensor, out_dim: int, scaled: bool) -> Tensor:
    """:func:`gemm_importances` of one product; ``scaled``: output parts with their common factor."""
    if out_dim == CONTRACTED:
        return contraction_importance(x, y)
    return output_term_norms(x, y, out_dim, scaled)


def sketched_product(x: Tensor, y: Tensor, idx: Tensor, scale: Tensor, out_dim: int) -> Tensor:
    """``x @ y`` with the diagonal sketch ``(idx, scale)`` on one axis: ``x S y`` (``out_dim = -1``),
    ``S (x y)`` (``0``) or ``(x y) S`` (``1``), as a GEMM on the ``k`` kept indices
    (:func:`~ubcompile.sketches.matmul.sketched_matmul`);
    contiguous."""
    out = sketched_matmul(x, y, Diagonal(idx, scale), None if out_dim == CONTRACTED else out_dim)
    return out.contiguous()  # the strides the fake promises (a copy only for broadcast batch dims)


@torch.library.custom_op("ubcompile::sketched_gemm", mutates_args=())
def sketched_gemm(x: Tensor, y: Tensor, idx: Tensor, scale: Tensor, out_dim: int) -> Tensor:
    """:func:`sketched_product` as one graph op, run eagerly: two gathers, a scale and a GEMM (the
    compiled body was 1.5x as slow, its gather transposing the kept rows of ``G^T`` element by
    element for the GEMM's layout)."""
    return sketched_product(x, y, idx, scale, out_dim)


def _product_like(x: Tensor, y: Tensor) -> Tensor:
    return x.new_empty((*torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]), x.shape[-2], y.shape[-1]))


@sketched_gemm.register_fake
def _(x: Tensor, y: Tensor, idx: Tensor, scale: Tensor, out_dim: int) -> Tensor:
    return _product_like(x, y)


def gemm_draw(x: Tensor, y: Tensor, out_dim: int, sketch: str, k: int, seed: Tensor, key: int,
              shared: Sequence[Tensor] = (), shared_dims: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
    """``k`` indices of the axis of ``x @ y`` that ``out_dim`` names and their weights, drawn from
    ``seed`` and the stream ``key``: ``"uniform"``, equal probabilities ``k / n`` (weight ``n / k``,
    0-d); ``"norm"``, the minimal-variance probabilities of :func:`gemm_importances` (weights
    ``1 / pi``, one per index) for this product and the ones it is ``shared`` with. Weights in :func:`~.sketches.norm.probability_dtype`: ``100 / 7`` in
    bf16 would be 0.2% too large."""
    if sketch == "norm":
        return draw_kernels.pps(gemm_importances(x, y, out_dim, shared, shared_dims), k, seed, key)
    n = sampled_size(x, y, out_dim)
    return draw_kernels.uniform(n, k, seed, key), draw_kernels.uniform_weight(x, n, k)


@kernel
def drawn_product(x: Tensor, y: Tensor, out_dim: int, sketch: str, k: int, seed: Tensor, key: int,
                  shared: list[Tensor], shared_dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The body of :func:`sampled_gemm`, compiled whole (one call, 22 ATen ops on CPU where the
    draw compiled alone and the rest eager took 40, and 10-15% less time)."""
    idx, scale = gemm_draw(x, y, out_dim, sketch, k, seed, key, shared, shared_dims)
    return sketched_product(x, y, idx, scale, out_dim), idx, scale


@torch.library.custom_op("ubcompile::sampled_gemm", mutates_args=())
def sampled_gemm(x: Tensor, y: Tensor, out_dim: int, sketch: str, k: int, seed: Tensor, site: int,
                 shared: list[Tensor], shared_dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``x @ y`` estimated from ``k`` indices of one axis drawn by ``sketch`` (:func:`gemm_draw`):
    the sampled GEMM as one graph op, its randomness the graph's ``seed`` input and its ``site``.

    Returns the estimate (:func:`sketched_product`, unbiased: each index is kept with probability
    ``pi_j`` and weighted by ``1 / pi_j``; variance about ``sum_j (1 / pi_j - 1) ||t_j||^2`` for the
    ``n`` parts ``t_j`` of ``x @ y`` along the axis), the kept indices and their weights, which the
    products sharing the draw (the layer's other gradient under ``grad="both"``) read; their
    operands are ``shared`` (pairs) and their ``out_dim``s ``shared_dims``, so that a norm draw
    serves them all (:func:`gemm_importances`).
    """
    return drawn_product(x, y, out_dim, sketch, k, seed, draw_kernels.stream_of(site, 0), shared, shared_dims)


@sampled_gemm.register_fake
def _(x: Tensor, y: Tensor, out_dim: int, sketch: str, k: int, seed: Tensor, site: int,
      shared: list[Tensor], shared_dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    scale = x.new_empty((k,) if sketch == "norm" else (), dtype=probability_dtype(x.dtype))
    return _product_like(x, y), x.new_empty((k,), dtype=torch.long), scale


@torch.library.custom_op("ubcompile::sketched_conv_backward", mutates_args=())
def sketched_conv_backward(g: Tensor, x: Tensor, w: Tensor, idx: Tensor, scale: Tensor, stride: list[int],
                           padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
                           groups: int, axis: int, mask: list[bool]) -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_weight)`` of a convolution with the diagonal sketch ``(idx, scale)`` on
    ``axis`` of ``G`` (its output channels or its batch, :data:`~ubcompile.sketches.conv.SKETCHED_VJPS`);
    an output ``mask`` leaves out is an empty tensor."""
    geometry = ConvGeometry.of(stride, padding, dilation, transposed, output_padding, groups)
    return sketched_conv_grads(g, x, w, idx, scale, geometry, axis, (mask[0], mask[1]))


def sketched_conv_grads(g: Tensor, x: Tensor, w: Tensor, idx: Tensor, scale: Tensor, geometry: ConvGeometry,
                        axis: int, mask: tuple[bool, bool]) -> tuple[Tensor, Tensor]:
    """What :func:`sketched_conv_backward` computes, as a plain function; contiguous results."""
    gi, gw = SKETCHED_VJPS[axis](g, x, w, Diagonal(idx, scale), geometry, mask)
    return (x.new_empty(0) if gi is None else gi.contiguous()), (w.new_empty(0) if gw is None else gw.contiguous())


@sketched_conv_backward.register_fake
def _(g: Tensor, x: Tensor, w: Tensor, idx: Tensor, scale: Tensor, stride: list[int], padding: list[int],
      dilation: list[int], transposed: bool, output_padding: list[int], groups: int, axis: int,
      mask: list[bool]) -> tuple[Tensor, Tensor]:
    return (x.new_empty(x.shape if mask[0] else (0,)), w.new_empty(w.shape if mask[1] else (0,)))


@torch.library.custom_op("ubcompile::sampled_conv_backward", mutates_args=())
def sampled_conv_backward(g: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                          transposed: bool, output_padding: list[int], groups: int, axis: int, mask: list[bool],
                          sketch: str, k: int, strata: int, seed: Tensor,
                          site: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A convolution's sampled ``(grad_input, grad_weight)`` with the draw it makes: ``k`` indices
    of ``axis`` of ``G`` (its output channels or its batch) drawn by ``sketch`` from ``seed`` and
    ``site`` (``k / strata`` in each of ``strata`` groups), as one graph op.

    ``"norm"`` draws from :func:`~ubcompile.sketches.conv.conv_importance` (for the gradients
    ``mask`` asks for, one draw for both), ``"uniform"`` with equal
    probabilities. Returns :func:`sketched_conv_backward`'s gradients (unbiased; the
    Horvitz-Thompson variance of :mod:`ubcompile.sketches.conv`), the kept indices and their weights.
    """
    geometry = ConvGeometry.of(stride, padding, dilation, transposed, output_padding, groups)
    if sketch == "norm":
        importance = conv_importance(g, x, w, axis, geometry, (mask[0], mask[1]))
        idx, scale = draw_kernels.pps_indices(importance, k, seed, site, strata)
    else:
        idx, scale = draw_kernels.uniform_indices(g, g.shape[axis], k, seed, site, strata)
    return *sketched_conv_grads(g, x, w, idx, scale, geometry, axis, (mask[0], mask[1])), idx, scale


@sampled_conv_backward.register_fake
def _(g: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
      output_padding: list[int], groups: int, axis: int, mask: list[bool], sketch: str, k: int, strata: int,
      seed: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    scale = g.new_empty((k,) if sketch == "norm" else (), dtype=probability_dtype(g.dtype))
    return (x.new_empty(x.shape if mask[0] else (0,)), w.new_empty(w.shape if mask[1] else (0,)),
            g.new_empty((k,), dtype=torch.long), scale)
