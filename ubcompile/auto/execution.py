"""The tensor code of one controlled call: the terms' norms, the residual split, the draw and the
product, each part but the plain sketched product compiled once for all sizes
(:func:`ubcompile.kernels.kernel`)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import draw_kernels
from ..estimator_ops import CONTRACTED, sketched_product
from ..kernels import kernel
from ..sketches.counter_rng import normal
from ..sketches.norm import factor_norms
from ..sketches.residual import ResidualSplit, residual_contraction
from .policy import RESIDUAL_RANK


@kernel
def term_norms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``||x[:, j]||``, ``||y[j, :]||``, the terms' norms ``a_j`` (their products) and ``sum_j a_j^2``
    (float64): what every call of a site needs, in one compiled kernel."""
    x_norms, y_norms = factor_norms(x, y)
    a = x_norms * y_norms
    return x_norms, y_norms, a, a.double().square().sum()


@kernel
def residual_split(x: Tensor, y: Tensor, x_norms: Tensor, y_norms: Tensor, seed: Tensor,
                   key: int) -> tuple[Tensor, ...]:
    """The tensors of the rank-:data:`RESIDUAL_RANK` :class:`~.sketches.residual.ResidualSplit`
    of ``x @ y``, from Gaussian probes of the counter generator, and its residual terms' norms."""
    probes = normal(seed, key, 2 * x.shape[1] * RESIDUAL_RANK).reshape(2, x.shape[1], RESIDUAL_RANK)
    split = ResidualSplit.from_probes(x, y, probes[0], probes[1])
    return split.u, split.v, split.xu, split.yv, split.importance(x_norms, y_norms)


@kernel
def residual_product(x: Tensor, y: Tensor, u: Tensor, v: Tensor, xu: Tensor, yv: Tensor, idx: Tensor,
                     weights: Tensor) -> Tensor:
    """:func:`~.sketches.residual.residual_contraction` on the split's tensors, compiled."""
    return residual_contraction(x, y, ResidualSplit(u, v, xu, yv), idx, weights)


def controlled_product(x: Tensor, y: Tensor, sketch: str, k: int, norms: tuple[Tensor, Tensor], a: Tensor,
                       seed: Tensor, key: int) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
    """``x @ y`` with ``k`` of its ``n`` contracted rows kept by ``sketch`` (``"norm"``: the terms'
    norms ``a``; ``"residual"``: a :func:`residual_split`), exact at ``k = n``; and the split's
    tensors, when it made one. Every random number comes from ``seed`` and the site's ``key``."""
    split = residual_split(x, y, *norms, seed, draw_kernels.stream_of(key, 1)) if sketch == "residual" else None
    if k == x.shape[1]:
        return x @ y, split
    idx, weights = draw_kernels.pps(a if split is None else split[-1], k, seed, draw_kernels.stream_of(key, 0))
    if split is None:
        return sketched_product(x, y, idx, weights, CONTRACTED), None
    return residual_product(x, y, *split[:-1], idx, weights), split
