"""Matrix products with one axis sampled by a diagonal sketch ``S`` (``E[S] = I``).

The sketch keeps the indices ``idx`` (a subset of ``range(n)``) with weights ``scale`` (one number,
or one per kept index): ``S = sum_{i} scale_i e_{idx_i} e_{idx_i}^T``. For the uniform fixed-size
sketch ``scale = n / k``; for the norm sketch ``scale_i = 1 / pi_{idx_i}``.
Both functions produce exactly the result of inserting ``S`` in the product, but as smaller
dense GEMMs on the kept indices: the zero rows/columns of ``S`` are never multiplied.
"""

from __future__ import annotations

from typing import Union

from torch import Tensor

Scale = Union[float, Tensor]


def sampled_contraction(x: Tensor, y: Tensor, idx: Tensor, scale: Scale) -> Tensor:
    """``x @ S @ y`` for ``x: (..., M, n)``, ``y: (..., n, N)``: column-row sampling of the contraction.

    ``x @ y = sum_j x[..., j] y[..., j, :]``; the estimator keeps the terms in ``idx`` (one draw
    shared by every batch entry): ``scale * x[..., idx] @ y[..., idx, :]``, a (batched) GEMM of
    inner size ``k`` instead of ``n``.
    Unbiased when every ``j`` is kept with probability ``1 / scale``. Its variance for the uniform
    sketch is :func:`ubcompile.sketches.uniform.uniform_variance` of the terms ``x[:, j] y[j, :]``.
    """
    return (x[..., idx] * scale) @ y[..., idx, :]


def sampled_output(x: Tensor, y: Tensor, idx: Tensor, scale: Scale, dim: int) -> Tensor:
    """``S @ (x @ y)`` (``dim = 0``) or ``(x @ y) @ S`` (``dim = 1``): sampled output rows or columns.

    ``dim`` counts the two matrix dims; leading batch dims share the draw.

    Only the kept rows (columns) are computed, by a GEMM with ``k`` instead of ``n`` rows
    (columns), and scaled; the others are zero. Each entry is an independent Horvitz-Thompson
    estimate ``scale * 1[j kept] * (x @ y)[j]``: unbiased, with variance
    ``(scale - 1) * (x @ y)[j]^2`` per entry under uniform keep-probability ``1 / scale``.
    """
    if dim == 1:
        return sampled_output(y.mT, x.mT, idx, scale, 0).mT
    per_row = isinstance(scale, Tensor) and scale.dim() == 1
    rows = (x[..., idx, :] * (scale.unsqueeze(-1) if per_row else scale)) @ y
    return scatter_rows(rows, idx, x.shape[-2], dim=-2)


def scatter_rows(rows: Tensor, idx: Tensor, n: int, dim: int) -> Tensor:
    """The tensor with ``n`` entries along ``dim`` that holds ``rows`` at ``idx`` and zeros elsewhere."""
    moved = rows.movedim(dim, 0)
    full = moved.new_zeros((n, *moved.shape[1:])).index_put((idx,), moved)
    return full.movedim(0, dim)
