"""Rank-constrained sketches: random projections ``S = Omega Omega^T`` with ``E[S] = I``.

``x @ S @ y = (x @ Omega) @ (Omega^T @ y)`` costs ``k (M n + n N + M N)`` instead of ``M n N``: it
pays when ``k`` is small against the dims, and it keeps only ``k``-dimensional projections where a
product must be stored. Two distributions of the ``n x k`` matrix ``Omega``:

* :func:`orthonormal_sketch`: ``Omega = sqrt(n / k) Q`` with ``Q`` Haar-distributed with
  orthonormal columns (QR of a Gaussian matrix, signs fixed). ``E[Q Q^T] = (k / n) I``.
* :func:`gaussian_sketch`: ``Omega = G / sqrt(k)`` with i.i.d. standard normal ``G``.
  ``E[G G^T] = k I``. For a product, the total variance has the closed form
  :func:`gaussian_total_variance`.

Unlike the diagonal sketches these mix all ``n`` entries of the sampled axis, so every output
entry is perturbed; there is no index to gather.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .axis import Projection
from .matmul import sketched_contraction, sketched_output


def gaussian_sketch(n: int, k: int, generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n x k`` matrix with i.i.d. ``N(0, 1 / k)`` entries: ``E[Omega Omega^T] = I``."""
    return gaussian_projection(torch.randn(n, k, generator=generator, device=device, dtype=torch.float64), dtype)


def gaussian_projection(g: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`gaussian_sketch` from its standard normal ``n x k`` matrix ``g``."""
    return (g / g.shape[1] ** 0.5).to(dtype)


def orthonormal_sketch(n: int, k: int, generator: Optional[torch.Generator] = None,
                       device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``sqrt(n / k) Q`` with ``Q`` (``n x k``) uniformly distributed with orthonormal columns."""
    return orthonormal_projection(torch.randn(n, k, generator=generator, device=device, dtype=torch.float64), dtype)


def orthonormal_projection(g: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`orthonormal_sketch` from its standard normal ``n x k`` matrix ``g``."""
    n, k = g.shape
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # makes Q Haar-distributed
    return (q * (n / k) ** 0.5).to(dtype).contiguous()


def projected_contraction(x: Tensor, y: Tensor, omega: Tensor) -> Tensor:
    """``x @ Omega @ Omega^T @ y``, evaluated as ``(x @ Omega) @ (Omega^T @ y)``: unbiased for ``x @ y``."""
    return sketched_contraction(x, y, Projection(omega))


def projected_output(x: Tensor, y: Tensor, omega: Tensor, dim: int) -> Tensor:
    """``Omega Omega^T (x @ y)`` (``dim = 0``) or ``(x @ y) Omega Omega^T`` (``dim = 1``), unbiased.

    Evaluated through the ``k``-dimensional projection: ``Omega @ ((Omega^T @ x) @ y)``.
    """
    return sketched_output(x, y, Projection(omega), dim)


def gaussian_total_variance(x: Tensor, y: Tensor, k: int) -> Tensor:
    """``E ||x S y - x y||_F^2`` for the Gaussian sketch: ``(||x y||_F^2 + ||x||_F^2 ||y||_F^2) / k``.

    Each entry ``a^T S b`` has variance ``((a^T b)^2 + ||a||^2 ||b||^2) / k`` (Isserlis' theorem).
    """
    x, y = x.double(), y.double()
    return ((x @ y).square().sum() + x.square().sum() * y.square().sum()) / k
