"""The data-dependent diagonal sketch of minimal variance, sampled at a fixed size.

To estimate ``T = sum_j t_j`` from ``k`` of the ``n`` terms, keep term ``j`` with probability
``pi_j`` and weight it by ``1 / pi_j`` (Horvitz-Thompson): ``sum_{j kept} t_j / pi_j`` is unbiased
when every nonzero term has ``pi_j > 0``. A term that is exactly zero adds nothing whether it is
kept or not, so it gets ``pi_j = 0``: it is never drawn for its own sake, and where the fixed size
makes the sample take it anyway its weight is ``0``, never ``1 / 0``. With independent (Poisson)
inclusion the variance is ``sum_{j: pi_j > 0} (1 / pi_j - 1) ||t_j||^2``; under the budget
``sum_j pi_j = k``, ``0 <= pi_j <= 1``, it is minimal at ``pi_j = min(1, c ||t_j||)`` with ``c``
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

Probabilities and weights are at least float32 (float64 for float64 importances): from a
half-precision importance a small ``pi`` has a reciprocal beyond fp16's range (``1 / 3e-7``), and
bf16 would round each weight by up to 0.4%, a bias. The sketches apply them in that precision
(:meth:`~.axis.Diagonal.weighted`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor



def probability_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the probabilities and weights drawn from importances of ``dtype``: float64 for
    float64, float32 otherwise (at least float32; ``torch.promote_types`` would dispatch an ATen op)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def floored(importance: Tensor) -> Tensor:
    """``importance`` in float64 with its positive entries floored at ``1e-6`` of the mean, so that
    every nonzero term keeps a positive probability. (The floor is a literal: a module-level float
    would reach a compiled body as a tensor input that Dynamo re-creates at every call, 3 ATen ops.)"""
    a = importance.double()
    return torch.where(a > 0, a.clamp_min(1e-6 * a.mean()), 0.0)


def water_fill(importance: Tensor, k: int) -> Tensor:
    """Inclusion probabilities ``pi_j = min(1, c * a_j)`` with ``sum pi = min(k, nnz)`` (cap and re-spread).

    ``importance`` is a non-negative vector ``a`` of length ``n >= k``, zero only where the term is
    zero. An entry ``a_j = 0`` gets ``pi_j = 0``; positive entries are floored at ``1e-6`` of the
    mean, so that every nonzero term can be drawn. With fewer than ``k`` positive entries each gets
    ``pi_j = 1`` (:func:`draw_mass` fills the sample up). Exact, vectorised, on the device, without
    a host sync: with ``a_(0) >= a_(1) >= ...`` in decreasing order, the ``m`` largest are capped
    where ``m`` is the first count for which ``(k - m) a_(m) <= sum_{j >= m} a_(j)``. That count is
    at most ``k`` (``m = k`` always fits), so only the ``k`` largest are ordered (``topk``: 15 us
    against 60 us for sorting all 2176 on CPU). ``c = (k - m) / (sum of the uncapped)`` sums the
    uncapped directly, not as a difference of sums. Computed in float64, returned in
    :func:`probability_dtype`.
    """
    a = floored(importance)
    top = a.topk(k).values
    m = torch.arange(k, device=a.device)
    # tail[m] = sum of all but the m largest; a difference of sums, so only the test reads it, with
    # a relative slack far below the float32 the probabilities are returned in.
    tail = (a.sum() - (top.cumsum(0) - top)).clamp_min(0.0)
    fits = (k - m) * top <= tail * (1 + 1e-12)
    first = torch.where(fits.any(), fits.int().argmax(), k)  # argmax: the first fit, on the device
    smallest_capped = top.gather(0, (first - 1).clamp_min(0).reshape(1))  # gather: no host sync
    capped = (a >= torch.where(first > 0, smallest_capped, torch.inf)) & (a > 0)
    uncapped_sum = torch.where(capped, 0.0, a).sum()
    # With fewer than k positive entries all are capped, uncapped_sum is 0 and c = inf: the zeros stay 0.
    c = (k - capped.sum()) / uncapped_sum
    pi = torch.where(capped, 1.0, torch.where(a > 0, (c * a).clamp_max(1.0), 0.0))
    return pi.to(probability_dtype(importance.dtype))


def draw_mass(pi: Tensor, k: int) -> Tensor:
    """How much of the fixed-size sample each index takes: ``pi``, and, when fewer than ``k``
    entries have ``pi_j > 0``, the ``k - nnz`` left over spread evenly over the zero entries.

    Sums to ``k`` and stays ``<= 1``. A zero entry gets mass only in that case: then every positive
    entry has ``pi_j = 1``, and the zeros drawn to keep the size static carry weight 0.
    """
    zero = pi == 0
    zeros = zero.sum()
    spare = (k - (pi.shape[0] - zeros)).clamp_min(0)
    return torch.where(zero, spare.to(pi.dtype) / zeros.clamp_min(1), pi)


def inverse_probability_weights(pi: Tensor) -> Tensor:
    """The Horvitz-Thompson weights ``1 / pi_j`` of kept indices, ``0`` where ``pi_j = 0`` (a zero term)."""
    return torch.where(pi > 0, pi.reciprocal(), 0.0)


def systematic_sample(pi: Tensor, k: int, offset: Tensor) -> Tensor:
    """The ``k`` indices hit by the points ``offset + i`` on the cumulative sum of ``pi`` (``sum pi = k``).

    ``offset`` is one ``U[0, 1)`` draw. Index ``j`` owns the interval ``[C_{j-1}, C_j)`` of length
    ``pi_j <= 1``, so it is hit at most once and with probability exactly ``pi_j`` (never when
    ``pi_j = 0``). The cumulative sum is float64. Sorted output.
    """
    cum = pi.double().cumsum(0)
    cum = cum * (k / cum[-1])  # rounding must not leave the last point past the end
    points = offset.double() + torch.arange(k, device=pi.device, dtype=torch.float64)
    return torch.searchsorted(cum, points, right=True).clamp_max(pi.shape[0] - 1)


def pps_sample(importance: Tensor, k: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """``k`` distinct indices drawn with the minimal-variance probabilities, and their weights.

    ``pi = water_fill(importance, k)``; the weights are ``1 / pi`` (``0`` for the zero terms a sample
    with fewer than ``k`` positive importances must include, :func:`draw_mass`), in
    :func:`probability_dtype`. ``sum_{j kept} w_j t_j`` is unbiased for ``sum_j t_j`` whenever
    ``t_j = 0`` where ``importance_j = 0``; its variance is about
    ``sum_{j: pi_j > 0} (1 / pi_j - 1) ||t_j||^2`` (:func:`poisson_variance`).
    """
    n, device = importance.shape[0], importance.device
    order = torch.randperm(n, generator=generator, device=device)
    return pps_draw(importance, k, order, torch.rand((), generator=generator, device=device, dtype=torch.float64))


def pps_draw(importance: Tensor, k: int, order: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`pps_sample` with its randomness given: ``order`` a uniformly random permutation of
    ``range(n)``, ``offset`` one ``U[0, 1)`` draw (0-d). A pure function of its inputs.

    The indices come in the random order, not sorted: a sort would be the draw's fourth (after
    the order's, the water-filling's and the two scans), and the gathers that use them take rows
    or columns whole, in any order."""
    pi = water_fill(importance, k)
    idx = order[systematic_sample(draw_mass(pi, k)[order], k, offset)]
    return idx, inverse_probability_weights(pi[idx])


def bernoulli_sample(pi: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Independent inclusions with probabilities ``pi`` (variable size): indices and weights ``1 / pi``.

    For analysis only: the size varies from draw to draw, so compiled graphs never use it. With
    ``pi = p`` everywhere it is the uniform Bernoulli mask of the paper.
    """
    keep = torch.rand(pi.shape, generator=generator, device=pi.device, dtype=torch.float64) < pi
    idx = keep.nonzero().squeeze(-1)
    return idx, pi[idx].reciprocal()


def factor_norms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(||x[..., :, j]||, ||y[..., j, :]||)``: the norms of the two factors of each term of ``x @ y``,
    in :func:`probability_dtype` (a half-precision product of two small norms would round to 0 and
    make a nonzero term look like a zero one)."""
    return (torch.linalg.vector_norm(x, dim=-2, dtype=probability_dtype(x.dtype)),
            torch.linalg.vector_norm(y, dim=-1, dtype=probability_dtype(y.dtype)))


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
    """``a_i = ||t.select(dim, i)||``: the norm of each slice of ``t`` along ``dim``, in :func:`probability_dtype`."""
    return torch.linalg.vector_norm(t, dim=[d for d in range(t.dim()) if d != dim % t.dim()],
                                    dtype=probability_dtype(t.dtype))


def output_term_norms(x: Tensor, y: Tensor, out_dim: int, scaled: bool = True) -> Tensor:
    """``a_j >= ||(x @ y)[j, :]||`` for ``out_dim = 0`` (rows), ``>= ||(x @ y)[:, j]||`` for ``1``.

    Cauchy-Schwarz: ``||x[j, :] @ y|| <= ||x[j, :]|| ||y||_F``. Without ``scaled`` the factor
    ``||y||_F``, common to every ``j`` of a 2-D product, is left out (the probabilities drawn from
    these are scale-free). Batched, with one draw shared by the batch, ``a_j`` is the root of the
    sum over the batch of the squares.
    """
    sliced, whole, dim = (x, y, -1) if out_dim == 0 else (y, x, -2)
    norms = torch.linalg.vector_norm(sliced, dim=dim, dtype=probability_dtype(sliced.dtype))  # (..., n)
    if scaled:
        norms = norms * torch.linalg.vector_norm(whole, dim=(-2, -1), dtype=norms.dtype).unsqueeze(-1)
    if norms.dim() == 1:
        return norms
    return norms.reshape(-1, norms.shape[-1]).square().sum(0).sqrt()


def poisson_variance(terms: Tensor, pi: Tensor) -> Tensor:
    """Elementwise variance of ``sum_j 1[j kept] t_j / pi_j`` with independent inclusions.

    ``terms`` has the ``n`` summands along dim 0: ``Var = sum_{j: pi_j > 0} (1 / pi_j - 1) t_j^2``
    (a term with ``pi_j = 0`` must be zero).
    """
    weight = torch.where(pi > 0, pi.reciprocal() - 1, 0.0).reshape(-1, *([1] * (terms.dim() - 1)))
    return (weight * terms.square()).sum(0)


def contraction_poisson_total_variance(x: Tensor, y: Tensor, pi: Tensor) -> Tensor:
    """``sum`` over the entries of :func:`poisson_variance` for the terms of ``x @ y``:
    ``sum_{j: pi_j > 0} (1/pi_j - 1) ||t_j||^2``."""
    norms = x.double().square().sum(0) * y.double().square().sum(1)
    pi = pi.double()
    return (torch.where(pi > 0, pi.reciprocal() - 1, 0.0) * norms).sum()
