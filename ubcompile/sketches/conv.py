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
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .axis import AxisSketch
from .norm import output_importance, probability_dtype

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

    @classmethod
    def of(cls, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], transposed: bool,
           output_padding: Sequence[int], groups: int) -> "ConvGeometry":
        """The geometry of a convolution op's schema arguments (lists or tuples)."""
        return cls(tuple(stride), tuple(padding), tuple(dilation), bool(transposed), tuple(output_padding), int(groups))

    @property
    def out_channel_dim(self) -> int:
        """The dim of ``w`` that runs along ``G``'s channels."""
        return 1 if self.transposed else 0


Grads = tuple[Optional[Tensor], Optional[Tensor]]


def implicit_gemm_sizes(g: Sequence[int], x: Sequence[int], w: Sequence[int], transposed: bool) -> tuple[int, int, int, int]:
    """``(batch, channels of G, positions, per_channel)`` of a convolution's gradients as implicit
    GEMMs, from the shapes of ``G``, ``x`` and ``w``: each position of the convolution's input side
    (``x`` for a transposed convolution, else ``G``) meets the whole kernel once, and a channel of
    ``G`` has a weight slice of ``per_channel`` entries (input channels of its group times the kernel's size)."""
    positions = math.prod((x if transposed else g)[2:])
    return g[0], g[1], positions, math.prod(w) // g[1]


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
    """``(G S) J`` with ``S`` on the batch: a convolution backward on ``k`` (mixed) samples.

    The weight gradient alone is a sum of one bilinear term per sample, ``G_b`` with ``x_b``: the
    sketch's weights may scale either, and scale the smaller (a pass over the kept copy less)."""
    if not mask[0] and x.numel() < g.numel():
        return None, conv_vjp(sketch.restrict(g, BATCH), sketch.weighted(x, BATCH), w, geometry, mask)[1]
    gi, gw = conv_vjp(sketch.weighted(g, BATCH), sketch.restrict(x, BATCH), w, geometry, mask)
    return (sketch.extend(gi, BATCH, x.shape[0]) if gi is not None else None), gw


SKETCHED_VJPS = {CHANNELS: channel_sketched_vjp, BATCH: batch_sketched_vjp}
"""The sketched VJP for each axis of ``G``."""


CONTRACTED_OUTPUT = {CHANNELS: 0, BATCH: 1}
"""The gradient (0: input, 1: weight) that sums over each axis of ``G``; the other runs along it."""


def conv_importance(g: Tensor, x: Tensor, w: Tensor, axis: int, geometry: ConvGeometry,
                    mask: tuple[bool, bool]) -> Tensor:
    """Per-index weights for the norm sketch on ``axis`` of ``G``, for the gradients ``mask`` says.

    Bounds on the ``j``-th part of each (Cauchy-Schwarz through the unfolded GEMM, each up to the
    same factor ``sqrt(kernel taps)``, exact for 1x1 convolutions): the gradient that contracts the
    axis has the term ``||G_j|| ||c_j||`` (``c``: ``w``'s output channels, or ``x``'s samples), the
    one along it the slice ``||G_j|| ||o||_F`` (``o``: ``x``, its group's channels with ``groups >
    1``, or ``w``). One draw serves both (``grad="both"``): the sum of their variances is minimal at
    ``pi_j`` proportional to ``||G_j|| sqrt(||c_j||^2 + ||o||_F^2)``, positive wherever either part
    is nonzero (a zero filter ``w_j`` still has a weight gradient). A gradient alone: its own bound,
    without the factor common to every ``j``.
    """
    weights = output_importance(g, axis)
    contracted, along = mask[CONTRACTED_OUTPUT[axis]], mask[1 - CONTRACTED_OUTPUT[axis]]
    if not contracted:
        return weights
    co = output_importance(w, geometry.out_channel_dim) if axis == CHANNELS else output_importance(x, BATCH)
    if not along:
        return weights * co
    return weights * (co.square() + _slice_factor(x, w, axis, geometry, g.shape[CHANNELS]).square()).sqrt()


def sample_term_bounds(g: Tensor, x: Tensor) -> Tensor:
    """``||G[b]|| ||x[b]||``: :func:`conv_importance` of the batch for the weight gradient alone (a
    bound on sample ``b``'s term ``||t_b||`` up to a factor common to every ``b``), which reads
    neither ``w`` nor the geometry."""
    return output_importance(g, BATCH) * output_importance(x, BATCH)


def _slice_factor(x: Tensor, w: Tensor, axis: int, geometry: ConvGeometry, channels: int) -> Tensor:
    """``||o||_F`` of :func:`conv_importance`, per channel of ``G`` (per group of ``x``) or 0-d."""
    if axis == BATCH:
        return torch.linalg.vector_norm(w, dtype=probability_dtype(w.dtype))
    groups = geometry.groups
    per_group = torch.linalg.vector_norm(x.reshape(x.shape[0], groups, -1), dim=(0, 2),
                                         dtype=probability_dtype(x.dtype))
    return per_group.repeat_interleave(channels // groups) if groups > 1 else per_group[0]


_CHUNK_ELEMENTS = 1 << 24  # bound on the per-sample weight gradients held at once


def sample_weight_sq_norms(g: Tensor, x: Tensor, w: Tensor, geometry: ConvGeometry) -> Tensor:
    """``||t_b||^2`` (float64) of each sample's weight gradient ``t_b = corr(G[b], x[b])``, whose sum
    over the batch is ``grad_weight``: the terms of the batch sketch, exactly.

    Computed as one convolution backward with the batch folded into the groups (``groups * b``),
    whose weight gradient stacks the samples' own: the exact weight gradient's FLOPs, in chunks of
    samples that hold at most about 2^24 elements of per-sample gradients at once. On a CPU the
    grouped backward runs group by group: for 128 samples, 3x the exact gradient's time on the
    experiments' BagNet's strided 3x3 convolution, 0.8x on its 1x1 64 -> 128, and 4,700 ATen ops for
    its three sites (im2col and a batched GEMM: half the ops, 0.86x the time on the 3x3, 1.4x on
    the 1x1).
    """
    b = g.shape[0]
    step = max(1, min(b, _CHUNK_ELEMENTS // max(1, w.numel())))
    norms = []
    for start in range(0, b, step):
        gs, xs = g[start:start + step], x[start:start + step]
        n = gs.shape[0]
        folded = dataclasses.replace(geometry, groups=geometry.groups * n)
        _, per_sample = conv_vjp(gs.reshape(1, -1, *gs.shape[2:]), xs.reshape(1, -1, *xs.shape[2:]),
                                 w.repeat(n, *([1] * (w.dim() - 1))), folded, (False, True))
        norms.append(per_sample.reshape(n, -1).double().square().sum(1))
    return torch.cat(norms)
