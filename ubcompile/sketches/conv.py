"""Convolution VJPs with the channel or batch axis of the cotangent sketched.

For ``y = conv(x, w)`` with cotangent ``G`` of shape ``(batch, C_out, *spatial)`` both gradients are
bilinear in ``G`` and in the other operand, and both are sums over ``G``'s channels and over its
batch entries:

* ``grad_input = sum_c VJP_input(G[:, c], w[c])``, ``grad_weight[c] = sum_b corr(G[b, c], x[b])``;
* ``grad_weight = sum_b corr(G[b], x[b])``, ``grad_input[b] = VJP_input(G[b], w)``.

A sketch ``S`` (:mod:`.axis`) on the **channel** axis therefore becomes a convolution backward with
``k`` output channels: it estimates ``grad_input`` by a sampled contraction and computes only the
kept rows of ``grad_weight``. A sketch on the **batch** axis becomes a convolution backward on ``k``
samples: it estimates ``grad_weight`` by a sampled contraction and computes only the kept samples
of ``grad_input``. Both are unbiased for any ``S`` with ``E[S] = I``. For the diagonal sketches the
variance is that of the Horvitz-Thompson sum, ``sum_j (1 / pi_j - 1) ||t_j||^2`` with ``t_j`` the
``j``-th term above (``||t_j|| <= ||G_j|| ||x_j|| ...``: :func:`conv_importance` uses these bounds).
With ``groups > 1`` a channel sketch must keep the same number of channels in every group
(a stratified draw, :func:`ubcompile.sketches.uniform.stratified`); the sampled convolution then
has the same groups. A transposed convolution's groups share one weight slice per kept channel,
so channel sketches need ``groups == 1`` there.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .axis import AxisSketch
from .norm import output_importance

CHANNELS, BATCH = 1, 0
"""The sketched axis of ``G``."""


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The non-tensor arguments of ``aten.convolution_backward``."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    @property
    def out_channel_dim(self) -> int:
        """The dim of ``w`` that runs along ``G``'s channels."""
        return 1 if self.transposed else 0


Grads = tuple[Optional[Tensor], Optional[Tensor]]


def conv_vjp(g: Tensor, x: Tensor, w: Tensor, geometry: ConvGeometry, mask: tuple[bool, bool]) -> Grads:
    """Exact ``(grad_input, grad_weight)``, each computed only where ``mask`` says (else ``None``)."""
    gi, gw, _ = torch.ops.aten.convolution_backward(
        g, x, w, None, list(geometry.stride), list(geometry.padding), list(geometry.dilation),
        geometry.transposed, list(geometry.output_padding), geometry.groups, [mask[0], mask[1], False])
    return gi, gw


def channel_sketched_vjp(g: Tensor, x: Tensor, w: Tensor, sketch: AxisSketch, geometry: ConvGeometry,
                         mask: tuple[bool, bool]) -> Grads:
    """``(G S) J`` with ``S`` on the output channels: a convolution backward with ``k`` channels.

    With ``groups > 1``, ``S`` must keep ``k / groups`` channels of each group (sorted)."""
    assert geometry.groups == 1 or not geometry.transposed, "transposed channel sketches need groups == 1"
    wdim = geometry.out_channel_dim
    gi, gw = conv_vjp(sketch.weighted(g, CHANNELS), x, sketch.restrict(w, wdim), geometry, mask)
    return gi, (sketch.extend(gw, wdim, w.shape[wdim]) if gw is not None else None)


def batch_sketched_vjp(g: Tensor, x: Tensor, w: Tensor, sketch: AxisSketch, geometry: ConvGeometry,
                       mask: tuple[bool, bool]) -> Grads:
    """``(G S) J`` with ``S`` on the batch: a convolution backward on ``k`` (mixed) samples."""
    gi, gw = conv_vjp(sketch.weighted(g, BATCH), sketch.restrict(x, BATCH), w, geometry, mask)
    return (sketch.extend(gi, BATCH, x.shape[0]) if gi is not None else None), gw


SKETCHED_VJPS = {CHANNELS: channel_sketched_vjp, BATCH: batch_sketched_vjp}
"""The sketched VJP for each axis of ``G``."""


def co_operand(x: Tensor, w: Tensor, axis: int, geometry: ConvGeometry) -> tuple[Tensor, int]:
    """The operand a gradient contracts with ``G`` over ``axis``, and its dim along that axis:
    ``w``'s output channels for the channel axis, ``x``'s samples for the batch."""
    return (w, geometry.out_channel_dim) if axis == CHANNELS else (x, BATCH)


def conv_importance(g: Tensor, co_operand: Tensor, axis: int, co_dim: int, contracted: bool) -> Tensor:
    """Per-index weights for the norm sketch on ``axis`` of ``G``.

    ``||G_j||`` times, when the sampled gradient contracts the axis, ``||co_operand_j||`` along
    ``co_dim`` (``w``'s channels, or ``x``'s samples): the Cauchy-Schwarz bound on the norm of the
    ``j``-th term, exact up to a constant factor for 1x1 convolutions. An output axis is weighted
    by ``||G_j||`` alone (the other factor is the same for every ``j``).
    """
    weights = output_importance(g, axis)
    return weights * output_importance(co_operand, co_dim) if contracted else weights
