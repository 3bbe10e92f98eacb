"""The counter-based generator the graphs draw with: uniform, independent across streams and seeds,
the same eager and compiled. Bounds are the tests' own distributions at alpha = 1e-3."""

import math

import pytest
import torch

from ubcompile.sketches.counter_rng import normal, order_and_offset, stream_key, uniform, words
from ubcompile.testing import critical_z

N = 100_000
SEED = torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)
KS_CRITICAL = 1.95  # sqrt(n) * sup|F_n - F| exceeds it with probability 1e-3 (Kolmogorov distribution)


def ks_statistic(u: torch.Tensor) -> float:
    n = u.shape[0]
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    srt = u.sort().values
    return float(torch.maximum(grid - srt, srt - (grid - 1 / n)).max()) * math.sqrt(n)


def correlation_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(n) times the sample correlation: about N(0, 1) for independent sequences."""
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]) * math.sqrt(a.shape[0])


def test_uniform_draws_are_uniform():
    u = uniform(SEED, stream_key(0), N)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert ks_statistic(u) < KS_CRITICAL


@pytest.mark.parametrize("other", [(SEED, 1), (SEED + 1, 0), (SEED + 2**32, 0), (SEED, 2**31)])
def test_streams_and_seeds_are_uncorrelated(other):
    """Including a lag of one: a stream must not be a shifted copy of another."""
    a, b = uniform(SEED, stream_key(0), N + 1), uniform(other[0], stream_key(other[1]), N + 1)
    bound = critical_z(3)
    assert abs(correlation_z(a[:-1], b[:-1])) < bound
    assert abs(correlation_z(a[:-1], b[1:])) < bound and abs(correlation_z(a[1:], b[:-1])) < bound


def test_the_same_tests_catch_a_correlated_or_skewed_sequence():
    a = uniform(SEED, stream_key(0), N + 1)
    shifted = a[1:] + 0.05 * torch.rand(N, generator=torch.Generator().manual_seed(0))
    assert abs(correlation_z(a[1:], shifted)) > critical_z(3)
    assert ks_statistic(a.sqrt()) > KS_CRITICAL



def test_orders_are_uniform():
    """The position of element 0 in a random order of 8, over 1600 seeds: chi-square with 7 dof."""
    n, seeds = 8, 1600
    counts = torch.zeros(n)
    for s in range(seeds):
        perm, offset = order_and_offset(torch.tensor(s), stream_key(0), n)
        assert 0 <= offset < 1
        assert sorted(perm.tolist()) == list(range(n))
        counts[int((perm == 0).nonzero())] += 1
    chi2 = float(((counts - seeds / n) ** 2 / (seeds / n)).sum())
    assert chi2 < 24.32  # chi-square(7) quantile at 1 - 1e-3


def test_normal_moments():
    z = normal(SEED, stream_key(3), N)
    se = 1 / math.sqrt(N)
    assert abs(float(z.mean())) < 4 * se and abs(float(z.var()) - 1) < 4 * math.sqrt(2) * se


def test_words_are_the_same_compiled():
    compiled = torch.compile(lambda seed: words(seed, stream_key(5), 1000), backend="inductor", fullgraph=True)
    assert torch.equal(compiled(SEED), words(SEED, stream_key(5), 1000))
