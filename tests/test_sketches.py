"""The estimator math alone: pure tensor functions, no graphs."""

import pytest
import torch

from ubcompile.sketches import keep_count, sampled_contraction, sampled_output, uniform_subset, uniform_variance
from ubcompile.sketches.axis import gather
from ubcompile.testing import assert_unbiased_samples, critical_t, critical_z, z_scores

DRAWS = 2000


@pytest.mark.parametrize("n, p, k", [(256, 0.25, 64), (100, 0.1, 10), (10, 0.25, 3), (7, 1.0, 7), (3, 1e-6, 1)])
def test_keep_count(n, p, k):
    assert keep_count(n, p) == k


def test_uniform_subset_is_sorted_distinct_and_uniform():
    gen = torch.Generator().manual_seed(0)
    n, k = 20, 5
    counts = torch.zeros(n)
    for _ in range(DRAWS):
        idx = uniform_subset(n, k, gen)
        assert idx.dtype == torch.long and len(idx.unique()) == k and torch.equal(idx, idx.sort().values)
        counts[idx] += 1
    # Each inclusion count is Binomial(DRAWS, k/n) (marginally); z-test every index.
    pi = k / n
    z = (counts - DRAWS * pi) / (DRAWS * pi * (1 - pi)) ** 0.5
    assert z.abs().max() < critical_z(n)


def _operands(seed=0, m=6, n=40, q=5):
    gen = torch.Generator().manual_seed(seed)
    # Skewed column scales make the terms unequal, as gradients are.
    x = torch.randn(m, n, generator=gen) * torch.rand(n, generator=gen) * 3
    y = torch.randn(n, q, generator=gen)
    return x, y


def _draw_contraction(x, y, k, gen, scale=None):
    n = x.shape[1]
    return sampled_contraction(x, y, uniform_subset(n, k, gen), n / k if scale is None else scale)


def test_sampled_contraction_is_unbiased():
    x, y = _operands()
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([_draw_contraction(x, y, 10, gen) for _ in range(DRAWS)])
    assert_unbiased_samples(samples, x @ y)


@pytest.mark.parametrize("dim", [0, 1])
def test_sampled_output_is_unbiased(dim):
    x, y = _operands()
    gen = torch.Generator().manual_seed(2)
    n = (x @ y).shape[dim]
    samples = torch.stack([sampled_output(x, y, uniform_subset(n, 2, gen), n / 2, dim) for _ in range(DRAWS)])
    assert_unbiased_samples(samples, x @ y)


def _resolution(samples, exact):
    """Smallest relative scale error the z-test resolves: ``bound`` standard errors along ``exact``."""
    test = z_scores(samples, exact)
    direction = exact.reshape(-1) / exact.norm()
    se = (samples.reshape(len(samples), -1) @ direction).std() / len(samples) ** 0.5
    return test.bound * float(se) / float(exact.norm())


@pytest.mark.parametrize("bias", ["scale error of twice the resolution", "no scale", "top-k by norm"])
def test_a_biased_estimator_fails_the_same_test(bias):
    x, y = _operands()
    n, k = x.shape[1], 10
    gen = torch.Generator().manual_seed(1)
    if bias == "top-k by norm":  # meProp-style: deterministic largest terms, rescaled
        top = (x.norm(dim=0) * y.norm(dim=1)).topk(k).indices
        draw = lambda: sampled_contraction(x, y, top, n / k)  # noqa: E731
    elif bias == "no scale":
        draw = lambda: _draw_contraction(x, y, k, gen, 1.0)  # noqa: E731
    else:
        unbiased = torch.stack([_draw_contraction(x, y, k, gen) for _ in range(DRAWS)])
        factor = 1 + 2 * _resolution(unbiased, x @ y)
        draw = lambda: _draw_contraction(x, y, k, gen, factor * n / k)  # noqa: E731
    samples = torch.stack([draw() for _ in range(DRAWS)])
    assert not z_scores(samples, x @ y).passed


def test_the_bound_keeps_its_false_alarm_rate_at_few_draws():
    """An unbiased estimator seen through 20 draws: its z-scores are t-distributed with 19 degrees
    of freedom. The t bound flags at most ``alpha`` of the trials (Bonferroni); the normal bound,
    the control, flags far more (about 0.17 here)."""
    gen = torch.Generator().manual_seed(0)
    exact, trials, alpha = torch.randn(50, generator=gen), 1000, 0.1
    results = [z_scores(exact + torch.randn(20, 50, generator=gen), exact, alpha=alpha) for _ in range(trials)]
    limit = alpha * trials + critical_z(1) * (trials * alpha * (1 - alpha)) ** 0.5
    assert sum(not r.passed for r in results) <= limit
    assert sum(bool(r.z.abs().max() > critical_z(len(r.z), alpha)) for r in results) > limit


@pytest.mark.parametrize("dof, table", [(9, 4.781), (19, 3.883), (29, 3.659), (120, 3.373)])
def test_critical_t_matches_the_t_table(dof, table):
    """Two-sided 0.1% points of Student's t (any statistics table)."""
    assert abs(critical_t(1, dof) - table) < 2e-3
    assert critical_z(1) < critical_t(1, dof)


def test_uniform_variance_matches_closed_form():
    x, y = _operands(m=3, n=30, q=2)
    _n, k = x.shape[1], 6
    gen = torch.Generator().manual_seed(3)
    samples = torch.stack([_draw_contraction(x, y, k, gen) for _ in range(DRAWS)]).double()
    terms = torch.einsum("mj,jq->jmq", x, y).double()  # the n summands of x @ y
    predicted = uniform_variance(terms, k)
    measured = samples.var(dim=0)
    # The sample variance of D draws has relative standard error sqrt((kurtosis - 1) / D);
    # estimate the kurtosis from the draws themselves.
    centred = samples - samples.mean(0)
    kurtosis = centred.pow(4).mean(0) / centred.pow(2).mean(0).pow(2)
    rel_se = ((kurtosis - 1) / DRAWS).sqrt()
    z = (measured / predicted - 1) / rel_se
    assert z.abs().max() < critical_z(z.numel()), z


def test_full_keep_is_exact():
    x, y = _operands()
    n = x.shape[1]
    assert torch.allclose(sampled_contraction(x, y, torch.arange(n), 1.0), x @ y, atol=1e-5)
    assert torch.allclose(uniform_variance(torch.randn(n, 3), n), torch.zeros(3))


@pytest.mark.parametrize("shape, perm, dim", [((30, 12), (1, 0), 1), ((30, 12), (1, 0), 0), ((30, 12), (0, 1), 1),
                                              ((4, 30, 12), (0, 2, 1), 2), ((4, 30, 12), (2, 1, 0), 2),
                                              ((4, 30, 12), (1, 0, 2), 1)])
def test_gather_in_memory_order_is_plain_indexing(shape, perm, dim):
    t = torch.randn(shape).permute(perm)  # a view: G^T of a weight gradient, a batched transpose...
    idx = torch.randperm(t.shape[dim])[:5]
    assert torch.equal(gather(t, idx, dim), t.index_select(dim, idx))
