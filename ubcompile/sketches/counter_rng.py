"""Random numbers as a pure function of a seed tensor and a counter: the draws a graph can see.

A counter-based generator maps ``(seed, stream, i)`` to a pseudo-random 32-bit word by a hash, so
the ``i``-th number of a stream needs no state: a compiled graph that receives the seed as an
input tensor draws the same numbers on every replay of the same seed (from a cache, inside a CUDA
graph), never reads a generator outside the graph, and never moves the seed to the host.

The hash is Chris Wellons' ``lowbias32`` (bias 0.17, hash-prospector), three rounds: of the
counter times the stream's key, an odd multiplier (so that two streams are not shifted copies of
one sequence; :func:`stream_key`), then with the seed's low word xor-ed in, then with its high word added. Every operation
stays in exact ``int64`` arithmetic: words are kept below ``2**32`` and each multiplier ``C > 2**31``
is applied as ``C - 2**32``, which has the same product modulo ``2**32`` and cannot overflow. The
rounds run in place, ten ATen ops each, which Inductor fuses into one kernel
(:mod:`ubcompile.kernels`).

The functions take the stream's key, a plain int computed on the host by :func:`stream_key`, so
that a function compiled with dynamic shapes receives it as one integer argument: Inductor's CPU
code generation miscompiles the bitwise mixing of a symbolic integer (a C++ compile error, torch
2.13).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK = 0xFFFF_FFFF
_C1 = 0x7FEB_352D
_C2 = 0x846C_A68B - (1 << 32)  # same low 32 bits of every product, no int64 overflow


def _mix(x: int) -> int:
    """``lowbias32`` of a Python int in ``[0, 2**32)``."""
    x ^= x >> 16
    x = (x * _C1) & _MASK
    x ^= x >> 15
    x = (x * _C2) & _MASK
    return x ^ (x >> 16)


def _mix_(x: Tensor) -> Tensor:
    """``lowbias32`` in place on int64 words in ``[0, 2**32)``."""
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16))
    x.mul_(_C1).bitwise_and_(_MASK)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15))
    x.mul_(_C2).bitwise_and_(_MASK)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16))


def stream_key(stream: int) -> int:
    """The key of ``stream`` (an int that separates the independent sequences one seed drives, one
    per draw of a graph): an odd multiplier below ``2**31``, so ``(i + 1) * key < 2**63``."""
    return (_mix(stream & _MASK) | 1) & 0x7FFF_FFFF


def words(seed: Tensor, key: int, n: int) -> Tensor:
    """``n`` pseudo-random 32-bit words (int64 in ``[0, 2**32)``) of the stream ``key`` under ``seed``.

    ``seed`` is a 0-d int64 tensor on the device the words are wanted on; ``key`` is
    :func:`stream_key` of the stream.
    """
    x = torch.arange(1, n + 1, device=seed.device, dtype=torch.int64).mul_(key).bitwise_and_(_MASK)
    _mix_(x).bitwise_xor_(seed.bitwise_and(_MASK))
    _mix_(x).add_(torch.bitwise_right_shift(seed, 32).bitwise_and_(_MASK)).bitwise_and_(_MASK)
    return _mix_(x)


def unit_interval(high: Tensor, low: Tensor) -> Tensor:
    """float64 in ``[0, 1)`` with 53 random bits from two words."""
    return torch.bitwise_left_shift(high, 21).bitwise_or_(torch.bitwise_right_shift(low, 11)).double().mul_(2.0**-53)


def uniform(seed: Tensor, key: int, n: int) -> Tensor:
    """``n`` float64 draws from ``U[0, 1)`` (two words each)."""
    w = words(seed, key, 2 * n)
    return unit_interval(w[:n], w[n:])


def order_and_offset(seed: Tensor, key: int, n: int) -> tuple[Tensor, Tensor]:
    """A random order of ``range(n)`` (int64) and one ``U[0, 1)`` offset (0-d float64), from one
    call: what a systematic sample draws. The order sorts ``n`` random 32-bit keys, ties broken by
    index; a systematic sample's inclusion probabilities are exact for any order, so ties cost
    nothing but a little of the order's randomness."""
    w = words(seed, key, n + 2)
    return torch.sort(w[:n], stable=True).indices, unit_interval(w[n], w[n + 1])


def normal(seed: Tensor, key: int, n: int) -> Tensor:
    """``n`` float64 standard normal draws (Box-Muller on :func:`uniform` pairs)."""
    u = uniform(seed, key, 2 * ((n + 1) // 2)).reshape(2, -1)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: no log(0)
    angle = 6.283185307179586 * u[1]  # 2 pi as a literal: torch.pi would enter a compiled body as a tensor input
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
