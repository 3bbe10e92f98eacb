"""The data-dependent diagonal sketch of minimal variance, sampled at a fixed size.

To estimate ``T = sum_j t_j`` from ``k`` of the ``n`` terms, keep term ``j`` with probability
``pi_j`` and weight it by ``1 / pi_j`` (Horvitz-Thompson): unbiased for any ``pi_j > 0``. With
independent (Poisson) inclusion its variance is ``sum_j (1 / pi_j - 1) ||t_j||^2``; under the
budget ``sum_j pi_j = k``, ``0 < pi_j <= 1``, it is minimal at ``pi_j = min(1, c ||t_j||)`` with ``c``
set so the budget is met (the KKT conditions: the uncapped ``pi_j`` are proportional to
``||t_j||``, the capped ones have ``c ||t_j|| >= 1``). :func:`water_fill` computes these
probabilities from any importances ``a_j``; for a matrix product ``x @ y`` the term norms are
``||x[:, j]|| ||y[j, :]||`` (:func:`contraction_importance`).

Compiled graphs need a fixed sample size: :func:`pps_sample` draws exactly ``k`` distinct
indices with exactly the inclusion probabilities ``pi`` by randomised systematic PPS sampling:
the indices in random order, one uniform offset, ``k`` evenly spaced points on the cumulative sum
of ``pi``. It is unbiased; the random order makes it simple random sampling when all ``pi`` are
equal (so it is never worse than the uniform sketch on flat importances), and its variance is
close to the Poisson formula :func:`poisson_variance` otherwise. :func:`bernoulli_sample` draws
the Poisson (independent, variable-size) design itself, for analysis only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOOR = 1e-6  # relative floor on importances: every index keeps a positive probability


def water_fill(importance: Tensor, k: int) -> Tensor:
    """Inclusion probabilities ``pi_j = min(1, c * a_j)`` with ``sum pi = k`` (cap and re-spread).

    ``importance`` is a non-negative vector ``a`` of length ``n >= k``; entries are floored at
    ``1e-6`` of their mean so that every index can be drawn (keeps the estimator unbiased when some
    ``a_j = 0``). Exact, vectorised: with ``a`` sorted in decreasing order, the ``m`` largest are
    capped where ``m`` is the first count for which ``(k - m) a_(m) <= sum_{j >= m} a_(j)``.
    """
    n = importance.shape[0]
    a = importance.double()
    a = a.clamp_min(_FLOOR * a.mean() + torch.finfo(torch.float64).tiny)
    sorted_a, order = a.sort(descending=True)
    tail = sorted_a.flip(0).cumsum(0).flip(0)  # tail[m] = sum of sorted_a[m:]
    m = torch.arange(n, device=a.device)
    # With the m largest capped, the rest stay <= 1. m = k always fits, so argmax finds the first
    # fit; it is computed on the device, without a host sync.
    fits = (k - m) * sorted_a <= tail
    capped = fits.int().argmax()
    c = (k - capped) / tail[capped]
    pi_sorted = torch.where(m < capped, torch.ones_like(sorted_a), c * sorted_a).clamp_max(1.0)
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted).to(importance.dtype)


def systematic_sample(pi: Tensor, k: int, offset: Tensor) -> Tensor:
    """The ``k`` indices hit by the points ``offset + i`` on the cumulative sum of ``pi`` (``sum pi = k``).

    ``offset`` is one ``U[0, 1)`` draw. Index ``j`` owns the interval ``[C_{j-1}, C_j)`` of length
    ``pi_j <= 1``, so it is hit at most once and with probability exactly ``pi_j``. Sorted output.
    """
    cum = pi.double().cumsum(0)
    cum = cum * (k / cum[-1])  # rounding must not leave the last point past the end
    points = offset.double() + torch.arange(k, device=pi.device, dtype=torch.float64)
    return torch.searchsorted(cum, points, right=True).clamp_max(pi.shape[0] - 1)


def pps_sample(importance: Tensor, k: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """``k`` sorted distinct indices drawn with the minimal-variance probabilities, and their weights ``1 / pi``."""
    pi = water_fill(importance, k)
    order = torch.randperm(pi.shape[0], generator=generator, device=pi.device)
    offset = torch.rand((), generator=generator, device=pi.device, dtype=torch.float64)
    idx = order[systematic_sample(pi[order], k, offset)].sort().values
    return idx, pi[idx].reciprocal()


def bernoulli_sample(pi: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Independent inclusions with probabilities ``pi`` (variable size): indices and weights ``1 / pi``.

    For analysis only: the size varies from draw to draw, so compiled graphs never use it. With
    ``pi = p`` everywhere it is the uniform Bernoulli mask of the paper.
    """
    keep = torch.rand(pi.shape, generator=generator, device=pi.device, dtype=torch.float64) < pi
    idx = keep.nonzero().squeeze(-1)
    return idx, pi[idx].reciprocal()


def factor_norms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(||x[..., :, j]||, ||y[..., j, :]||)``: the norms of the two factors of each term of ``x @ y``."""
    return torch.linalg.vector_norm(x, dim=-2), torch.linalg.vector_norm(y, dim=-1)


def contraction_importance(x: Tensor, y: Tensor) -> Tensor:
    """``a_j = ||x[:, j]|| * ||y[j, :]||``: the norm of the ``j``-th term of ``x @ y``.

    For batched ``x: (..., M, n)``, ``y: (..., n, N)`` with one draw shared by the batch, the
    ``j``-th term is the stack of the batch's terms: ``a_j = sqrt(sum_b ||x_b[:, j]||^2 ||y_b[j, :]||^2)``.
    """
    # Norms first: one read of each operand, no operand-sized temporaries.
    x_norms, y_norms = factor_norms(x, y)
    per_batch = x_norms * y_norms  # (..., n)
    if per_batch.dim() == 1:
        return per_batch
    return per_batch.reshape(-1, per_batch.shape[-1]).square().sum(0).sqrt()


def output_importance(t: Tensor, dim: int) -> Tensor:
    """``a_i = ||t.select(dim, i)||``: the norm of each slice of ``t`` along ``dim``."""
    return torch.linalg.vector_norm(t, dim=[d for d in range(t.dim()) if d != dim % t.dim()])


def poisson_variance(terms: Tensor, pi: Tensor) -> Tensor:
    """Elementwise variance of ``sum_j 1[j kept] t_j / pi_j`` with independent inclusions.

    ``terms`` has the ``n`` summands along dim 0: ``Var = sum_j (1 / pi_j - 1) t_j^2``.
    """
    weight = (pi.reciprocal() - 1).reshape(-1, *([1] * (terms.dim() - 1)))
    return (weight * terms.square()).sum(0)


def contraction_poisson_total_variance(x: Tensor, y: Tensor, pi: Tensor) -> Tensor:
    """``sum`` over the entries of :func:`poisson_variance` for the terms of ``x @ y``: ``sum_j (1/pi_j - 1) ||t_j||^2``."""
    norms = x.double().square().sum(0) * y.double().square().sum(1)
    return ((pi.double().reciprocal() - 1) * norms).sum()
