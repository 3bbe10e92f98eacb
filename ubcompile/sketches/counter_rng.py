"""Random numbers as a pure function of a seed tensor and a counter: the draws a graph can see.

A counter-based generator maps ``(seed, stream, i)`` to a pseudo-random 32-bit word by a hash, so
the ``i``-th number of a stream needs no state: a compiled graph that receives the seed as an
input tensor draws the same numbers on every replay of the same seed (from a cache, inside a CUDA
graph), never reads a generator outside the graph, and never moves the seed to the host.

The hash is Chris Wellons' ``lowbias32`` (bias 0.17, hash-prospector): the counter is hashed,
the key (from the seed's low word and the stream) added and hashed again, the key's second word
(from the seed's high word) mixed in and hashed a third time. Every operation stays in exact ``int64`` arithmetic:
words are kept below ``2**32`` and each multiplier ``C > 2**31`` is applied as ``C - 2**32``,
which has the same product modulo ``2**32`` and cannot overflow. Only elementwise integer ops,
so Inductor fuses them into the kernel that uses the numbers.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

_MASK = 0xFFFF_FFFF
_C1 = 0x7FEB_352D
_C2 = 0x846C_A68B - (1 << 32)  # same low 32 bits of every product, no int64 overflow
_TWEAK = 0x6A09_E667  # sqrt(2) bits: derives the second key apart from the first


Word = TypeVar("Word", int, Tensor)


def _lowbias32(x: Word) -> Word:
    """Wellons' ``lowbias32`` on words in ``[0, 2**32)``: Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _C2) & _MASK
    return x ^ (x >> 16)


def words(seed: Tensor, stream: int, n: int) -> Tensor:
    """``n`` pseudo-random 32-bit words (int64 in ``[0, 2**32)``) of ``stream`` under ``seed``.

    ``seed`` is a 0-d int64 tensor on the device the words are wanted on; ``stream`` (an int in
    ``[0, 2**32)``) separates the independent sequences one seed drives (one per draw of a graph). The counter is
    hashed before the keys enter, so two streams are not shifted copies of one sequence.
    """
    key = _lowbias32(((seed & _MASK) + _lowbias32(stream & _MASK)) & _MASK)
    key_hi = _lowbias32(((seed >> 32) & _MASK) ^ _lowbias32(key ^ _TWEAK))  # not the counter-0 word
    counter = torch.arange(n, device=seed.device, dtype=torch.int64)
    return _lowbias32(_lowbias32((_lowbias32(counter) + key) & _MASK) ^ key_hi)


def uniform(seed: Tensor, stream: int, n: int) -> Tensor:
    """``n`` float64 draws from ``U[0, 1)`` with 53 random bits each (two words per draw)."""
    w = words(seed, stream, 2 * n).reshape(n, 2)
    return ((w[:, 0] << 21) | (w[:, 1] >> 11)).double() * 2.0**-53


def permutation(seed: Tensor, stream: int, n: int) -> Tensor:
    """A uniformly random permutation of ``range(n)`` (int64): the order of ``n`` random 53-bit keys
    (ties, of probability below ``n**2 / 2**54``, broken by index)."""
    return torch.sort(uniform(seed, stream, n), stable=True).indices


def normal(seed: Tensor, stream: int, n: int) -> Tensor:
    """``n`` float64 standard normal draws (Box-Muller on :func:`uniform` pairs)."""
    u = uniform(seed, stream, 2 * ((n + 1) // 2)).reshape(2, -1)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u in (0, 1]: no log(0)
    angle = 2.0 * torch.pi * u[1]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
