"""The tensor code of one controlled call: the terms' norms, the residual split, the draw and the
product, each part but the plain sketched product and the convolutions compiled once for all sizes
(:func:`ubcompile.kernels.kernel`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import draw_kernels
from ..estimator_ops import CONTRACTED, gemm_importances, sketched_conv_grads, sketched_product
from ..kernels import kernel
from ..sketches.control import sketch_variance_vector
from ..sketches.counter_rng import normal
from ..sketches.conv import BATCH, ConvGeometry, sample_term_bounds
from ..sketches.norm import factor_norms
from ..sketches.residual import ResidualSplit, range_bases, residual_contraction, tracked_bases
from .policy import RESIDUAL_RANK


@kernel
def term_norms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``||x[:, j]||``, ``||y[j, :]||``, the terms' norms ``a_j`` (their products) and ``sum_j a_j^2``
    (float64, shape ``(1,)``: a 0-d float tensor passed to a compiled body makes Dynamo guard on its
    value, an ``item()`` per call): what every call of a site needs, in one compiled kernel."""
    x_norms, y_norms = factor_norms(x, y)
    a = x_norms * y_norms
    return x_norms, y_norms, a, a.double().square().sum().reshape(1)


@kernel
def norm_sketched_call(x: Tensor, y: Tensor, k: int, seed: Tensor, key: int) -> tuple[Tensor, Tensor, Tensor]:
    """A call on the norm sketch that neither measures nor uses the residual sketch, the most
    common call, compiled whole: ``x @ y`` from ``k`` of its ``n`` contracted rows, drawn from the
    terms' norms ``a_j`` (:func:`term_norms`) by the stream ``key`` of ``seed``, ``sum_j a_j^2``
    (shape ``(1,)``) for the spike guard and ``a`` for the nesting check: ``sampled_gemm``'s norm path
    (:func:`~ubcompile.estimator_ops.drawn_product`) with the guard's sum, which that op has no use
    for. One body where :func:`term_norms`, the draw and the eager product were three calls: each
    call of a compiled body costs about 85 us on a CPU core (Dynamo's guards, the wrapper),
    whatever its size."""
    *_, a, sq_norm = term_norms(x, y)
    idx, weights = draw_kernels.pps(a, k, seed, key)
    return sketched_product(x, y, idx, weights, CONTRACTED), sq_norm, a


@kernel
def propagated_call(x: Tensor, y: Tensor, out_dim: int, k: int, seed: Tensor, key: int) -> tuple[Tensor, Tensor]:
    """A propagated gradient ``x @ y`` from ``k`` of its output rows along ``out_dim``, drawn from the
    rows' norms by the stream ``key`` of ``seed`` (:func:`~ubcompile.estimator_ops.drawn_product`'s
    norm path), and how many of those norms are nonzero (shape ``(1,)``): what the nesting check
    compares with the step's first draw (:class:`~.controller.Propagation`)."""
    u = gemm_importances(x, y, out_dim)
    idx, weights = draw_kernels.pps(u, k, seed, key)
    return sketched_product(x, y, idx, weights, out_dim), (u > 0).sum().reshape(1)


@kernel
def measurement(out: Tensor, sq_sum: Tensor, ks: Tensor, terms: Tensor) -> Tensor:
    """A measurement's statistics as one float64 vector: ``sum_i ||s_i||^2`` (``sq_sum``, shape
    ``(1,)``), ``||T_hat||^2`` of the call's product ``out``, then ``V_sketch`` at each keep count
    ``ks`` (one per :data:`~.policy.LEVELS`) of the norm sketch and of the residual sketch.
    ``terms[s]`` holds sketch ``s``'s draw weights (row 0) and its terms' norms (row 1): the norm
    sketch's in ``terms[0]``, the residual sketch's in ``terms[1]`` (a site without the residual
    sketch repeats ``terms[0]``). One signature, so one compilation: with the counts computed
    inside from the symbolic ``n`` the body took 4 s to trace again at each warm start, per variant,
    and with the rows as separate arguments Dynamo compiled it again for the site that passed one
    tensor twice."""
    return torch.cat([sq_sum.double(), out.double().square().sum().reshape(1),
                      sketch_variance_vector(terms[0, 0], ks, terms[0, 1]),
                      sketch_variance_vector(terms[1, 0], ks, terms[1, 1])])


@kernel
def sample_bounds(g: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """A convolution's batch sketch for its weight gradient: the draw weights
    (:func:`~ubcompile.sketches.conv.sample_term_bounds`) and their squares' sum (float64, shape
    ``(1,)``) for the spike guard, in one compiled body."""
    a = sample_term_bounds(g, x)
    return a, a.double().square().sum().reshape(1)


def sampled_conv_weight(g: Tensor, x: Tensor, w: Tensor, geometry: ConvGeometry, k: int, a: Tensor,
                        seed: Tensor, key: int) -> Tensor:
    """A convolution's weight gradient from ``k`` of its samples, drawn from the weights ``a``
    (:func:`sample_bounds`) by the site's ``key`` of ``seed``: a convolution backward on the kept
    samples (:func:`~ubcompile.sketches.conv.batch_sketched_vjp`)."""
    idx, weights = draw_kernels.pps(a, k, seed, draw_kernels.stream_of(key, 0))
    return sketched_conv_grads(g, x, w, idx, weights, geometry, BATCH, (False, True))[1]


@kernel
def residual_bases(x: Tensor, y: Tensor, seed: Tensor, key: int) -> tuple[Tensor, Tensor]:
    """The rank-:data:`RESIDUAL_RANK` bases ``u`` (of ``x``'s columns) and ``v`` (of ``y``'s rows)
    of :class:`~.sketches.residual.ResidualSplit`, from Gaussian probes of the counter generator."""
    probes = normal(seed, key, 2 * x.shape[1] * RESIDUAL_RANK).reshape(2, x.shape[1], RESIDUAL_RANK)
    return range_bases(x, y, probes[0], probes[1])


@kernel
def tracked_residual_bases(x: Tensor, y: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~.sketches.residual.tracked_bases`, compiled: the bases ``u``, ``v`` carried to this call's data."""
    return tracked_bases(x, y, u, v)


@kernel
def residual_coordinates(x: Tensor, y: Tensor, u: Tensor, v: Tensor, x_norms: Tensor,
                         y_norms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``xu``, ``yv`` of the :class:`~.sketches.residual.ResidualSplit` of ``x @ y`` on the bases
    ``u``, ``v`` (made at this call or an earlier one), and its residual terms' norms."""
    split = ResidualSplit.on_bases(x, y, u, v)
    return split.xu, split.yv, split.importance(x_norms, y_norms)


@kernel
def residual_product(x: Tensor, y: Tensor, u: Tensor, v: Tensor, xu: Tensor, yv: Tensor, idx: Tensor,
                     weights: Tensor) -> Tensor:
    """:func:`~.sketches.residual.residual_contraction` on the split's tensors, compiled."""
    return residual_contraction(x, y, ResidualSplit(u, v, xu, yv), idx, weights)


def controlled_product(x: Tensor, y: Tensor, k: int, a: Tensor, split: Optional[tuple[Tensor, ...]],
                       seed: Tensor, key: int) -> Tensor:
    """``x @ y`` with ``k`` of its ``n`` contracted rows kept, exact at ``k = n``: by the norm
    sketch on the terms' norms ``a`` (``split`` None), else by the residual sketch on ``split``:
    ``u``, ``v`` and the :func:`residual_coordinates`. The draw comes from ``seed`` and the site's ``key``."""
    if k == x.shape[1]:
        return x.mm(y)
    idx, weights = draw_kernels.pps(a if split is None else split[-1], k, seed, draw_kernels.stream_of(key, 0))
    if split is None:
        return sketched_product(x, y, idx, weights, CONTRACTED)
    return residual_product(x, y, *split[:-1], idx, weights)
