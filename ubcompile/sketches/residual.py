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

The bases come from a randomised range finder (:func:`range_bases`, Halko, Martinsson and Tropp
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


def reduced_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) for a product with a small side (the bases' rank ``r`` rows or columns), as
    a broadcast product summed over the inner dimension: Inductor compiles it into a reduction loop
    of its own, with no GEMM call (the coordinates of :meth:`ResidualSplit.on_bases`: 0-15% slower
    than the two BLAS calls on CPU, one thread, 2026-12-04, for 7 fewer ATen ops a call). Run
    eagerly it holds ``a.shape[0] x inner x b.shape[1]`` elements."""
    return (a.unsqueeze(-1) * b.unsqueeze(0)).sum(1)


def orthonormal_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The ``Q`` factors of the QRs of ``a`` (``M x r``) and ``b`` (``N x r``), from one batched QR.

    Each is padded below with zero rows to ``M + N``: Householder reflectors leave zero rows below
    the data zero, so the padded factors are the unpadded ones with zero rows added (one
    ``linalg_qr`` call instead of two on the step path, its QR work doubled: ``O((M + N) r^2)``)."""
    m, big_n = a.shape[0], b.shape[0]
    q = torch.linalg.qr(torch.stack([torch.cat([a, a.new_zeros(big_n, a.shape[1])]),
                                     torch.cat([b, b.new_zeros(m, b.shape[1])])])).Q
    return q[0, :m], q[1, :big_n]


def _work(t: Tensor) -> Tensor:
    """``t`` in a dtype QR has kernels for: float32 for half precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _power_step(xs: Tensor, ys: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``orth(x x^T u)``, ``orth(y^T y v)``: one subspace iteration of each basis."""
    return orthonormal_pair(thin_product(xs, (u.mT @ xs).mT), thin_product(ys, (v.mT @ ys).mT))


def range_bases(x: Tensor, y: Tensor, x_probes: Tensor, y_probes: Tensor, power: int = 1) -> tuple[Tensor, Tensor]:
    """Orthonormal bases ``u`` (``M x r``) and ``v`` (``N x r``) close to the spans of the top ``r``
    left singular vectors of ``x: (M, n)`` and right singular vectors of ``y: (n, N)``.

    ``orth(x Omega)`` for the Gaussian probes ``x_probes`` (``n x r``), then ``power`` times
    ``orth(x x^T u)``; likewise for ``y^T`` with ``y_probes`` (each stage's two QRs are one call,
    :func:`orthonormal_pair`). In float32 for half-precision operands (QR has no half kernels),
    returned in their dtypes.
    """
    xs, ys = _work(x), _work(y.mT)
    u, v = orthonormal_pair(thin_product(xs, x_probes.to(xs.dtype)), thin_product(ys, y_probes.to(ys.dtype)))
    for _ in range(power):
        u, v = _power_step(xs, ys, u, v)
    return u.to(x.dtype), v.to(y.dtype)


def tracked_bases(x: Tensor, y: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`range_bases` started from earlier bases ``u``, ``v`` instead of random probes, with one
    power iteration: subspace iteration carried across batches, a third fewer GEMMs
    (:func:`tracking_flops`) and one QR call instead of two. Bases from any data leave the
    estimator unbiased; these track the top subspaces as training moves them."""
    xs, ys = _work(x), _work(y.mT)
    u, v = _power_step(xs, ys, u.to(xs.dtype), v.to(ys.dtype))
    return u.to(x.dtype), v.to(y.dtype)


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
        """The split with the bases :func:`range_bases` finds from the probes (each ``n x r``)."""
        return cls.on_bases(x, y, *range_bases(x, y, x_probes, y_probes, power))

    @classmethod
    def on_bases(cls, x: Tensor, y: Tensor, u: Tensor, v: Tensor) -> ResidualSplit:
        """The split of ``x @ y`` by given orthonormal bases, made from any data (an earlier batch's:
        the estimator is unbiased for every ``u``, ``v``; only its variance depends on them)."""
        return cls(u, v, reduced_product(u.mT, x), reduced_product(y, v))

    def importance(self, x_norms: Tensor, y_norms: Tensor) -> Tensor:
        """``||x_r[:, j]|| ||y_r[j, :]||`` from the plain factor norms ``||x[:, j]||``, ``||y[j, :]||``
        (:func:`~.norm.factor_norms`, computed once for both sketches):
        ``||x_r[:, j]||^2 = ||x[:, j]||^2 - ||(u^T x)[:, j]||^2``, and likewise for ``y``."""
        x_sq = x_norms.double().square() - self.xu.double().square().sum(0)
        y_sq = y_norms.double().square() - self.yv.double().square().sum(1)
        return (x_sq.clamp_min(0) * y_sq.clamp_min(0)).sqrt().to(x_norms.dtype)


def fused_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) for a small inner dimension (the bases' rank ``r``), as the sum of its
    ``r`` rank-one terms: pointwise, so Inductor fuses it with its consumer into one loop instead
    of calling a GEMM (one ATen call and two or three ``resolve_conj`` each, on every call). The
    inner size is read as a Python int: a compiled body specialises on it."""
    return sum(a[:, i, None] * b[None, i] for i in range(a.shape[1]))


def residual_contraction(x: Tensor, y: Tensor, split: ResidualSplit, idx: Tensor, scale: Scale) -> Tensor:
    """``L + x_r[:, idx] scale y_r[idx]``: exact low-rank part plus the sketched residual, one GEMM.

    ``L = u (u^T x y) + (x y v - u (u^T x y v)) v^T``; the kept residual columns are
    ``x[:, idx] - u xu[:, idx]`` and rows ``y[idx] - yv[idx] v^T``. Compiled, five GEMMs are
    called: the kept rows and the ``u`` side of the core are :func:`fused_product` s, fused with
    their subtractions (the kept columns are not: a gather of ``xu``'s columns inside the loop made
    it 8-15% slower than a GEMM on CPU, one thread, 2026-12-04).
    """
    u, v, xu, yv = split.u, split.v, split.xu, split.yv
    x_kept = ((x[:, idx] - u @ xu[:, idx]) * scale).to(x.dtype)  # float32 weights, x's GEMM dtype
    y_kept = y[idx] - fused_product(yv[idx], v.mT)
    xyv = thin_product(x, yv)
    left = torch.cat([u, xyv - fused_product(u, xu @ yv), x_kept], dim=1)
    right = torch.cat([xu @ y, v.mT, y_kept], dim=0)
    return left @ right


def basis_flops(m: int, n: int, big_n: int, r: int, power: int = 1) -> int:
    """GEMM FLOPs of the two range finders of :meth:`ResidualSplit.of` for ``x: (m, n)``,
    ``y: (n, N)``: ``2 r n (m + N) (1 + 2 power)`` (QR neglected)."""
    return 2 * r * n * (m + big_n) * (1 + 2 * power)


def tracking_flops(m: int, n: int, big_n: int, r: int) -> int:
    """GEMM FLOPs of :func:`tracked_bases`: one power iteration of each basis, ``4 r n (m + N)``."""
    return 4 * r * n * (m + big_n)


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
