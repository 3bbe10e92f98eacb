"""The two variances the keep-fraction controller (``p="auto"``) compares, from one batch.

For a weight gradient ``T = x @ y = sum_j t_j`` whose ``n`` terms are batch/token rows
(``t_j = x[:, j] y[j, :]``, norm ``a_j``, :func:`~.norm.contraction_importance`):

* **sketch variance** at keep count ``k``: the minimal-variance norm sketch keeps term ``j`` with
  probability ``pi_j(k)`` (:func:`~.norm.water_fill`), and its Poisson variance is
  ``V_sketch(k) = sum_j (1 / pi_j(k) - 1) a_j^2`` (:func:`sketch_variances`; the fixed-size
  systematic draw the graphs use is close to it).
* **minibatch-SGD variance**: the batch's ``b`` samples each contribute ``s_i`` (the sum of their
  rows' terms; the loss's ``1 / b`` is inside ``x`` or ``y``), ``T = sum_i s_i``, and the variance of
  ``T`` as an estimate of the population gradient is ``b Var(s)``, estimated without bias by
  ``V_sgd = b / (b - 1) (sum_i ||s_i||^2 - ||T||^2 / b)`` (:func:`sgd_variance`).

Their ratio ``r = V_sketch / V_sgd`` is the paper's trade-off: in the noise-dominated regime SGD
needs about ``1 + r`` times the steps.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .norm import contraction_importance, floored

_CHUNK_ELEMENTS = 1 << 24  # bound on the per-sample products held at once


def sketch_variance_vector(importance: Tensor, ks: Tensor, norms: Optional[Tensor] = None) -> Tensor:
    """``V_sketch(k) = sum_j (1 / pi_j(k) - 1) ||t_j||^2`` for each ``k`` of the int64 tensor ``ks``
    (``0`` for ``k >= n``), as one float64 tensor on ``importance``'s device (no host read), with
    ``pi_j`` drawn from ``importance`` (``a_j``) and ``||t_j||`` the terms' norms ``norms``: ``a``
    itself where the draw's weights are the terms' norms (rank-one terms of a GEMM), a bound on
    them elsewhere (a convolution's samples, :func:`~.conv.conv_importance`).

    :func:`~.norm.water_fill` for every ``k`` at once: one descending sort of the floored ``a``, and
    for each ``k`` the first ``m < k`` with ``(k - m) a_(m) <= sum_{j >= m} a_(j)`` (``k`` if none)
    caps the ``m`` largest at 1 and gives the rest ``pi_j = c a_j``, ``c = (k - m) / (sum of the
    uncapped)``.
    """
    a, f = (importance if norms is None else norms).double(), floored(importance)
    top = f.sort(descending=True).values
    tail = (f.sum() - (top.cumsum(0) - top)).clamp_min(0.0)  # sum of all but the m largest
    m = torch.arange(a.shape[0], device=a.device)
    k = ks.to(a.device).reshape(-1, 1)
    fits = ((k - m) * top <= tail * (1 + 1e-12)) & (m < k)
    first = torch.where(fits.any(1, keepdim=True), fits.int().argmax(1, keepdim=True), k)
    smallest_capped = top.gather(0, (first - 1).clamp_min(0).flatten()).reshape(-1, 1)
    smallest_capped = torch.where(first > 0, smallest_capped, torch.inf)
    capped = (f >= smallest_capped) & (f > 0)
    c = (k - capped.sum(1, keepdim=True)) / torch.where(capped, 0.0, f).sum(1, keepdim=True)
    pi = torch.where(capped, 1.0, torch.where(f > 0, (c * f).clamp_max(1.0), 0.0))
    variance = (torch.where(pi > 0, pi.reciprocal() - 1, 0.0) * a.square()).sum(1)
    return torch.where(k.flatten() >= a.shape[0], 0.0, variance)


def sketch_variances(importance: Tensor, ks: Sequence[int]) -> list[float]:
    """:func:`sketch_variance_vector` as Python floats."""
    return sketch_variance_vector(importance, torch.tensor(ks, device=importance.device)).tolist()


def sample_norms_flops(m: int, n: int, big_n: int, group: int) -> int:
    """FLOPs of :func:`sample_sq_norms` for ``x: (m, n)``, ``y: (n, big_n)`` (0 when ``group == 1``)."""
    return 0 if group == 1 else 2 * n * min(m * big_n, group * (m + big_n))


def sample_sq_norms(x: Tensor, y: Tensor, group: int) -> Tensor:
    """``||s_i||^2`` of each sample's part ``s_i = x[:, rows_i] @ y[rows_i]`` of ``x @ y``.

    ``x: (M, n)``, ``y: (n, N)``; sample ``i`` owns the ``group`` consecutive rows
    ``i * group ... (i + 1) * group - 1`` (a flattened ``(batch, tokens, features)`` tensor).
    With ``group == 1`` the parts are the rank-one terms, of norm ``a_j``
    (:func:`~.norm.contraction_importance`). Otherwise the cheaper of the per-sample products ``s_i`` (``2 n M N`` FLOPs) and their Gram form
    ``||s_i||^2 = sum((x_i^T x_i) * (y_i y_i^T))`` (``2 n group (M + N)``).
    """
    if group == 1:
        return contraction_importance(x, y).double().square()
    m, n = x.shape
    big_n = y.shape[1]
    b = n // group
    xs = x.reshape(m, b, group).permute(1, 2, 0)  # (b, group, M)
    ys = y.reshape(b, group, big_n)
    if group * (m + big_n) < m * big_n:
        return ((xs @ xs.mT).double() * (ys @ ys.mT).double()).sum((1, 2))
    step = max(1, _CHUNK_ELEMENTS // max(1, m * big_n))
    return torch.cat([(xs[i:i + step].mT @ ys[i:i + step]).double().square().sum((1, 2))
                      for i in range(0, b, step)])


def sgd_variance(sq_norms: Tensor, total_sq_norm: float) -> float:
    """``V_sgd = b / (b - 1) (sum_i ||s_i||^2 - ||T||^2 / b)`` from the ``b`` samples' ``||s_i||^2``."""
    return sgd_variance_of_sum(float(sq_norms.sum()), sq_norms.shape[0], total_sq_norm)


def sgd_variance_of_sum(sq_sum: float, b: int, total_sq_norm: float) -> float:
    """:func:`sgd_variance` from ``sum_i ||s_i||^2`` and ``b`` (NaN for a batch of one sample)."""
    if b < 2:
        return float("nan")
    return b / (b - 1) * (sq_sum - total_sq_norm / b)
