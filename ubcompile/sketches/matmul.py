"""Matrix products with one axis sampled by a diagonal sketch ``S`` (``E[S] = I``).

The sketch keeps the indices ``idx`` (a subset of ``range(n)``) with weights ``scale`` (one number,
or one per kept index): ``S = sum_{i} scale_i e_{idx_i} e_{idx_i}^T``. For the uniform fixed-size
sketch ``scale = n / k``; for the norm sketch ``scale_i = 1 / pi_{idx_i}``.
Both functions produce exactly the result of inserting ``S`` in the product, but as smaller
dense GEMMs on the kept indices: the zero rows/columns of ``S`` are never multiplied.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .axis import AxisSketch, Diagonal

Scale = Union[float, Tensor]


def matmul(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y``; ``mm`` itself for matrices (``matmul`` is one more op to dispatch)."""
    return torch.mm(x, y) if x.dim() == y.dim() == 2 else torch.matmul(x, y)


def sketched_contraction(x: Tensor, y: Tensor, sketch: AxisSketch) -> Tensor:
    """``x @ S @ y`` through the sketch's ``k``-dimensional space: ``weighted(x) @ restrict(y)``."""
    return matmul(sketch.weighted(x, -1), sketch.restrict(y, -2))


def sketched_output(x: Tensor, y: Tensor, sketch: AxisSketch, dim: int) -> Tensor:
    """``S @ (x @ y)`` (``dim = 0``) or ``(x @ y) @ S`` (``dim = 1``): ``k`` output rows (columns)
    computed, then moved back to ``n``. ``dim`` counts the two matrix dims."""
    if dim == 1:
        return sketch.extend(matmul(x, sketch.weighted(y, -1)), -1, y.shape[-1])
    return sketch.extend(matmul(sketch.weighted(x, -2), y), -2, x.shape[-2])


def sketched_matmul(x: Tensor, y: Tensor, sketch: AxisSketch, out_dim: Optional[int]) -> Tensor:
    """``x @ y`` with ``sketch`` on the contracted axis (``out_dim = None``: :func:`sketched_contraction`)
    or on output dim ``out_dim`` (:func:`sketched_output`)."""
    return sketched_contraction(x, y, sketch) if out_dim is None else sketched_output(x, y, sketch, out_dim)


def sampled_contraction(x: Tensor, y: Tensor, idx: Tensor, scale: Scale) -> Tensor:
    """``x @ S @ y`` for ``x: (..., M, n)``, ``y: (..., n, N)``: column-row sampling of the contraction.

    ``x @ y = sum_j x[..., j] y[..., j, :]``; the estimator keeps the terms in ``idx`` (one draw
    shared by every batch entry): ``scale * x[..., idx] @ y[..., idx, :]``, a (batched) GEMM of
    inner size ``k`` instead of ``n``.
    Unbiased when every ``j`` is kept with probability ``1 / scale``. Its variance for the uniform
    sketch is :func:`ubcompile.sketches.uniform.uniform_variance` of the terms ``x[:, j] y[j, :]``.
    """
    return sketched_contraction(x, y, Diagonal(idx, scale))


def kept_rows_contraction(x: Tensor, y_kept: Tensor, idx: Tensor, scale: Scale) -> Tensor:
    """``x @ S @ y`` from the kept rows ``y_kept = y[..., idx, :]``, gathered earlier (in the forward pass).

    The same estimate as :func:`sampled_contraction`; only ``x`` is gathered here.
    """
    return Diagonal(idx, scale).weighted(x, -1) @ y_kept


def sampled_output(x: Tensor, y: Tensor, idx: Tensor, scale: Scale, dim: int) -> Tensor:
    """``S @ (x @ y)`` (``dim = 0``) or ``(x @ y) @ S`` (``dim = 1``): sampled output rows or columns.

    ``dim`` counts the two matrix dims; leading batch dims share the draw.
    Only the kept rows (columns) are computed, by a GEMM with ``k`` instead of ``n`` rows
    (columns), and scaled; the others are zero. Each entry is an independent Horvitz-Thompson
    estimate ``scale * 1[j kept] * (x @ y)[j]``: unbiased, with variance
    ``(scale - 1) * (x @ y)[j]^2`` per entry under uniform keep-probability ``1 / scale``.
    """
    return sketched_output(x, y, Diagonal(idx, scale), dim)
