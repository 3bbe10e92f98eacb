"""The uniform fixed-size sketch: keep ``k`` of ``n`` indices uniformly without replacement.

Every index is kept with probability ``k / n``, so weighting the kept ones by ``n / k`` gives
``E[S] = I``. The size is fixed (exactly ``k``), which keeps tensor shapes static in compiled graphs.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Optional, TypeVar, Union

import torch
from torch import Tensor


Size = TypeVar("Size", int, torch.SymInt)


def keep_count(n: Size, p: float) -> Size:
    """``k = ceil(p * n)`` in integer arithmetic, so it also works on a symbolic size ``n``.

    ``p`` is read as the nearest fraction with a denominator of at most 10**6 (0.1 is 1/10, not
    0.1000000000000000055), so ``keep_count(100, 0.1) == 10``. ``k >= 1`` whenever ``n >= 1``.
    """
    frac = Fraction(p).limit_denominator(10**6)
    return -((-n * frac.numerator) // frac.denominator)


def uniform_scale(n: Union[int, torch.SymInt], k: Union[int, torch.SymInt]) -> Union[float, torch.SymFloat]:
    """The weight ``n / k`` of each kept index: every index is kept with probability ``k / n``."""
    return n / k


def uniform_subset(n: int, k: int, generator: Optional[torch.Generator] = None,
                   device: Optional[torch.device] = None) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(n)``, sorted ascending (int64).

    Sorting changes nothing statistically and makes the gathers that use the indices walk memory
    in order.
    """
    perm = torch.randperm(n, generator=generator, device=device)
    return perm[:k].sort().values


def systematic_positions(n: int, k: int, offset: Tensor) -> Tensor:
    """``floor((offset + i) n / k)`` for ``i < k``: ``k`` distinct positions in ``range(n)``, each
    taken with probability exactly ``k / n`` when ``offset`` is ``U[0, 1)`` (0-d). Applied to a random
    order, a fixed-size equal-probability sample (systematic sampling): the uniform sketch's
    indices, exact in their inclusion probabilities whatever the order."""
    points = offset.double() + torch.arange(k, device=offset.device, dtype=torch.float64)
    return points.mul_(n / k).floor_().long().clamp_max_(n - 1)


def uniform_variance(terms: Tensor, k: int) -> Tensor:
    """Exact variance of ``(n / k) * sum_{j in idx} terms[j]`` as an estimator of ``terms.sum(0)``.

    ``terms`` has the ``n`` summands along dim 0 (any trailing shape); the variance is elementwise.
    For simple random sampling without replacement of ``k`` of ``n`` terms,
    ``Var = n^2 (1 - k/n) s^2 / k`` with ``s^2 = sum_j (t_j - mean t)^2 / (n - 1)``;
    it is zero at ``k = n``.
    """
    n = terms.shape[0]
    if n == 1:
        return torch.zeros_like(terms[0])
    s2 = terms.var(dim=0, unbiased=True)
    return n * n * (1.0 - k / n) * s2 / k


def contraction_total_variance(x: Tensor, y: Tensor, k: int) -> Tensor:
    """``sum`` over the entries of :func:`uniform_variance` for the terms ``x[:, j] y[j, :]`` of ``x @ y``.

    Computed without materialising the ``n`` terms: ``sum_j ||t_j - mean t||^2 =
    sum_j ||x[:, j]||^2 ||y[j, :]||^2 - ||x @ y||^2 / n``.
    """
    n = x.shape[1]
    if n == 1:
        return x.new_zeros(())
    norms = x.double().square().sum(0) * y.double().square().sum(1)
    spread = norms.sum() - (x.double() @ y.double()).square().sum() / n
    return n * n * (1.0 - k / n) * spread / (k * (n - 1))


def stratified(draw: Callable[[int, int], tuple[Tensor, ...]], n: int, k: int, strata: int) -> tuple[Tensor, ...]:
    """One draw of ``k / strata`` indices in each of ``strata`` equal consecutive blocks of ``range(n)``.

    ``draw(block, k_block)`` returns the block's local indices (into ``range(n / strata)``) and any
    per-index tensors (weights). The union is unbiased when each block's draw is: the estimate is a
    sum of independent per-block estimates, and its variance the sum of theirs. Grouped
    convolutions need it: every group must keep the same number of channels.
    """
    if n % strata or k % strata:
        raise ValueError(f"n={n} and k={k} must be multiples of strata={strata}")
    if strata == 1:
        return draw(0, k)
    block = n // strata
    parts = [draw(s, k // strata) for s in range(strata)]
    idx = torch.cat([part[0] + s * block for s, part in enumerate(parts)])
    return (idx, *(torch.cat([part[i] for part in parts]) for i in range(1, len(parts[0]))))
