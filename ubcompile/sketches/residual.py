"""The residual sketch: a low-rank part computed exactly, the norm sketch on what is left.

For ``T = x @ y`` (``x: (M, n)``, ``y: (n, N)``, ``n`` the contracted batch/token rows) take
orthonormal bases ``U`` (``M x r``) and ``V`` (``N x r``) and the projectors ``P_U = U U^T``,
``P_V = V V^T``. Then exactly

    T = P_U T + T P_V - P_U T P_V + (x - P_U x) @ (y - y P_V) = L + x_r @ y_r,

and ``L`` has rank at most ``2 r``. The estimator computes ``L`` exactly and samples the residual
product ``x_r @ y_r`` with the norm sketch (:mod:`.norm`): keep term ``j`` with probability
``pi_j`` from the residual norms ``||x_r[:, j]|| ||y_r[j, :]||``. Given ``U`` and ``V`` it is
unbiased (``L`` is exact, the sketch is), so ``U`` and ``V`` may come from the data itself, and its
variance is the Poisson formula on the residual terms,
``V_res(k) = sum_j (1 / pi_j - 1) ||x_r[:, j]||^2 ||y_r[j, :]||^2``: small when the batch's
gradient rows ``x[:, j]`` or activations ``y[j]`` lie near an ``r``-dimensional subspace, as they do
in a classifier (the rows of ``dL/dy`` of a layer are images of the ``C``-dimensional logit
gradients). On the Fashion-MNIST MLP, ``r = 8`` leaves 1-15% of the plain norm sketch's variance
at the same ``k``, and 5-73% at the same FLOPs (``examples/residual_check.py``, docs/EXPERIMENTS.md).

The bases come from a randomised range finder (:func:`range_basis`, Halko, Martinsson and Tropp
2011): ``U = orth(x Omega)`` refined by power iterations, a few thin GEMMs. Everything is dense:
``L`` and the sampled residual go through one GEMM of inner size ``2 r + k``
(:func:`residual_contraction`), whose cost :func:`residual_flops` counts with the range finder's: with
``n = 256`` rows and ``M = N = 1024``, ``r = 8`` costs as much as 37 kept rows more, so the
controller (:mod:`ubcompile.auto`) compares the two sketches at equal FLOPs, per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .matmul import Scale


def thin_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a ``b`` of few columns, computed as ``(b^T a^T)^T``: the same product, but CPU
    BLAS runs the thin factor on the left 3-8x faster (``(1024 x 256) @ (256 x 8)``: 355-912 us as
    written, 103-112 us transposed, one thread, 2026-11-24)."""
    return (b.mT @ a.mT).mT


def range_basis(x: Tensor, omega: Tensor, power: int = 1) -> Tensor:
    """An orthonormal ``(M, r)`` basis close to the span of the top ``r`` left singular vectors of ``x: (M, n)``.

    ``orth(x Omega)`` for the Gaussian probes ``omega`` (``n x r``), then ``power`` times
    ``orth(x x^T U)``; in float32 for half-precision ``x`` (QR has no half kernels), returned in
    ``x``'s dtype.
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    u = torch.linalg.qr(thin_product(work, omega.to(work.dtype))).Q
    for _ in range(power):
        u = torch.linalg.qr(thin_product(work, (u.mT @ work).mT)).Q
    return u.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class ResidualSplit:
    """``x @ y`` split by the bases ``u`` of ``x``'s columns and ``v`` of ``y``'s rows (see the module docstring).

    ``xu = u^T x`` (``r x n``) and ``yv = y v`` (``n x r``) are the coordinates of every term's two
    factors in the bases; they give the residual norms without forming the residuals.
    """

    u: Tensor
    v: Tensor
    xu: Tensor
    yv: Tensor

    @classmethod
    def of(cls, x: Tensor, y: Tensor, r: int, generator: Optional[torch.Generator] = None,
           power: int = 1) -> ResidualSplit:
        """The split with rank-``r`` bases from Gaussian probes drawn from ``generator``."""
        probes = [torch.randn(x.shape[1], r, generator=generator, device=x.device, dtype=torch.float64)
                  for _ in range(2)]
        return cls.from_probes(x, y, *probes, power=power)

    @classmethod
    def from_probes(cls, x: Tensor, y: Tensor, x_probes: Tensor, y_probes: Tensor, power: int = 1) -> ResidualSplit:
        """The split with the bases :func:`range_basis` finds from the probes (each ``n x r``)."""
        return cls.on_bases(x, y, range_basis(x, x_probes, power), range_basis(y.mT, y_probes, power))

    @classmethod
    def on_bases(cls, x: Tensor, y: Tensor, u: Tensor, v: Tensor) -> ResidualSplit:
        """The split of ``x @ y`` by given orthonormal bases, made from any data (an earlier batch's:
        the estimator is unbiased for every ``u``, ``v``; only its variance depends on them)."""
        return cls(u, v, u.mT @ x, thin_product(y, v))

    def importance(self, x_norms: Tensor, y_norms: Tensor) -> Tensor:
        """``||x_r[:, j]|| ||y_r[j, :]||`` from the plain factor norms ``||x[:, j]||``, ``||y[j, :]||``
        (:func:`~.norm.factor_norms`, computed once for both sketches):
        ``||x_r[:, j]||^2 = ||x[:, j]||^2 - ||(u^T x)[:, j]||^2``, and likewise for ``y``."""
        x_sq = x_norms.double().square() - self.xu.double().square().sum(0)
        y_sq = y_norms.double().square() - self.yv.double().square().sum(1)
        return (x_sq.clamp_min(0) * y_sq.clamp_min(0)).sqrt().to(x_norms.dtype)


def residual_contraction(x: Tensor, y: Tensor, split: ResidualSplit, idx: Tensor, scale: Scale) -> Tensor:
    """``L + x_r[:, idx] scale y_r[idx]``: exact low-rank part plus the sketched residual, one GEMM.

    ``L = u (u^T x y) + (x y v - u (u^T x y v)) v^T``; the kept residual columns are
    ``x[:, idx] - u xu[:, idx]`` and rows ``y[idx] - yv[idx] v^T``.
    """
    u, v, xu, yv = split.u, split.v, split.xu, split.yv
    x_kept = ((x[:, idx] - u @ xu[:, idx]) * scale).to(x.dtype)  # float32 weights, x's GEMM dtype
    y_kept = y[idx] - yv[idx] @ v.mT
    xyv = thin_product(x, yv)
    left = torch.cat([u, xyv - u @ (xu @ yv), x_kept], dim=1)
    right = torch.cat([xu @ y, v.mT, y_kept], dim=0)
    return left @ right


def basis_flops(m: int, n: int, big_n: int, r: int, power: int = 1) -> int:
    """GEMM FLOPs of the two range finders of :meth:`ResidualSplit.of` for ``x: (m, n)``,
    ``y: (n, N)``: ``2 r n (m + N) (1 + 2 power)`` (QR neglected)."""
    return 2 * r * n * (m + big_n) * (1 + 2 * power)


def coordinate_flops(m: int, n: int, big_n: int, r: int) -> int:
    """GEMM FLOPs of the coordinates ``xu``, ``yv`` of :meth:`ResidualSplit.on_bases`: ``2 r n (m + N)``."""
    return 2 * r * n * (m + big_n)


def split_flops(m: int, n: int, big_n: int, r: int, power: int = 1) -> int:
    """GEMM FLOPs of :meth:`ResidualSplit.of`: the bases and the coordinates."""
    return basis_flops(m, n, big_n, r, power) + coordinate_flops(m, n, big_n, r)


def residual_flops(m: int, n: int, big_n: int, r: int, k: int, power: int = 1) -> int:
    """GEMM FLOPs of :meth:`ResidualSplit.of` and :func:`residual_contraction` with ``k`` terms kept.

    The split (:func:`split_flops`); ``xu @ y`` and ``x @ yv``, ``2 r n (N + m)``; ``u (xu yv)``,
    ``2 r^2 (n + m)``; the kept residual columns and rows, ``2 r k (m + N)``; the final GEMM,
    ``2 m N (2 r + k)``.
    """
    return (split_flops(m, n, big_n, r, power) + 2 * r * (n + k) * (m + big_n) + 2 * r * r * (n + m)
            + 2 * m * big_n * (2 * r + k))
