"""The diagonal-sketch estimators of GEMMs and convolutions as opaque graph ops.

The pass inserts ``ubcompile::gemm_importance`` / ``conv_importance`` and ``ubcompile::sketched_gemm``
/ ``sketched_conv_backward`` where a sampled gradient's importances and product are computed.
Inductor calls them like it calls ``mm`` (an extern kernel on the tensors as they are, views
included): traced as ATen nodes, their gathers, scales and scatters fused into different C++
kernels in every layer, which on CPU made the first step's compile 1.3-1.8x exact's
(benchmarks/RESULTS.md, "Compile time"). Each runs the pure functions of :mod:`ubcompile.sketches`,
the GEMM ones compiled once for all sizes (:func:`ubcompile.kernels.kernel`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import kernel
from .sketches.axis import Diagonal
from .sketches.conv import SKETCHED_VJPS, ConvGeometry, conv_importance as _conv_importance
from .sketches.matmul import sketched_matmul
from .sketches.norm import contraction_importance, output_importance, probability_dtype

CONTRACTED = -1
"""``out_dim`` of a sketch on the axis the product sums over (``x S y``)."""


def sampled_size(x: Tensor, y: Tensor, out_dim: int) -> int:
    """Length of the axis of ``x @ y`` that ``out_dim`` names (``CONTRACTED``: the inner one)."""
    return {CONTRACTED: x.shape[-1], 0: x.shape[-2], 1: y.shape[-1]}[out_dim]


@kernel
def gemm_importance_kernel(x: Tensor, y: Tensor, out_dim: int) -> Tensor:
    """The body of :func:`gemm_importance`, compiled."""
    if out_dim == CONTRACTED:
        return contraction_importance(x, y)
    return output_importance(x, -2) if out_dim == 0 else output_importance(y, -1)


@torch.library.custom_op("ubcompile::gemm_importance", mutates_args=())
def gemm_importance(x: Tensor, y: Tensor, out_dim: int) -> Tensor:
    """Norm of the part of ``x @ y`` each index of the sampled axis carries: the term norms
    ``||x[:, j]|| ||y[j, :]||`` of a contracted axis, the output row (column) norms of ``x`` (``y``)
    along output dim ``out_dim``."""
    return gemm_importance_kernel(x, y, out_dim)


@gemm_importance.register_fake
def _(x: Tensor, y: Tensor, out_dim: int) -> Tensor:
    return x.new_empty((sampled_size(x, y, out_dim),), dtype=probability_dtype(x.dtype))


def sketched_product(x: Tensor, y: Tensor, idx: Tensor, scale: Tensor, out_dim: int) -> Tensor:
    """``x @ y`` with the diagonal sketch ``(idx, scale)`` on one axis: ``x S y`` (``out_dim = -1``),
    ``S (x y)`` (``0``) or ``(x y) S`` (``1``), as a GEMM on the ``k`` kept indices
    (:func:`~ubcompile.sketches.matmul.sketched_matmul`);
    contiguous."""
    out = sketched_matmul(x, y, Diagonal(idx, scale), None if out_dim == CONTRACTED else out_dim)
    return out.contiguous()  # the strides the fake promises (a copy only for broadcast batch dims)


sketched_product_kernel = kernel(sketched_product)
""":func:`sketched_product` compiled: the body of :func:`sketched_gemm`."""


@torch.library.custom_op("ubcompile::sketched_gemm", mutates_args=())
def sketched_gemm(x: Tensor, y: Tensor, idx: Tensor, scale: Tensor, out_dim: int) -> Tensor:
    """:func:`sketched_product` as one graph op."""
    return sketched_product_kernel(x, y, idx, scale, out_dim)


@sketched_gemm.register_fake
def _(x: Tensor, y: Tensor, idx: Tensor, scale: Tensor, out_dim: int) -> Tensor:
    return x.new_empty((*torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]), x.shape[-2], y.shape[-1]))


@torch.library.custom_op("ubcompile::conv_importance", mutates_args=())
def conv_importance(g: Tensor, co_operand: Tensor, axis: int, co_dim: int, contracted: bool) -> Tensor:
    """:func:`ubcompile.sketches.conv.conv_importance` as one graph op."""
    return _conv_importance(g, co_operand, axis, co_dim, contracted)


@conv_importance.register_fake
def _(g: Tensor, co_operand: Tensor, axis: int, co_dim: int, contracted: bool) -> Tensor:
    return g.new_empty((g.shape[axis],), dtype=probability_dtype(g.dtype))


@torch.library.custom_op("ubcompile::sketched_conv_backward", mutates_args=())
def sketched_conv_backward(g: Tensor, x: Tensor, w: Tensor, idx: Tensor, scale: Tensor, stride: list[int],
                           padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
                           groups: int, axis: int, mask: list[bool]) -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_weight)`` of a convolution with the diagonal sketch ``(idx, scale)`` on
    ``axis`` of ``G`` (its output channels or its batch, :data:`~ubcompile.sketches.conv.SKETCHED_VJPS`);
    an output ``mask`` leaves out is an empty tensor."""
    geometry = ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), transposed, tuple(output_padding), groups)
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
