"""The norm (minimal-variance) sketch: probabilities, fixed-size sampling, unbiasedness, variance."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from ubcompile.estimator_ops import CONTRACTED, gemm_importances
from ubcompile.sketches import sampled_contraction, uniform_subset
from ubcompile.sketches.norm import (bernoulli_sample, contraction_importance, output_term_norms, poisson_variance,
                                     pps_sample, water_fill)
from ubcompile.testing import assert_unbiased_samples, critical_z

DRAWS = 2000


def skewed(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen).pow(4) * 10


@pytest.mark.parametrize("k", [1, 3, 10, 25, 39, 40])
def test_water_fill_satisfies_the_kkt_conditions(k):
    a = skewed()
    pi = water_fill(a, k).double()
    assert torch.isclose(pi.sum(), torch.tensor(float(k), dtype=torch.float64))
    assert (pi > 0).all() and (pi <= 1 + 1e-12).all()
    free = pi < 1 - 1e-9
    if free.any():
        c = pi[free] / a[free].double()
        assert torch.allclose(c, c.mean().expand_as(c), rtol=1e-6)  # uncapped: proportional to a
        assert (c.mean() * a[~free].double() >= 1 - 1e-9).all()  # capped: c * a >= 1


@pytest.mark.parametrize("k", [2, 5, 9])
def test_water_fill_matches_a_numerical_optimizer(k):
    a = skewed(n=12, seed=k).double().numpy()
    objective = lambda pi: float(np.sum(a**2 / pi))  # noqa: E731  Poisson variance up to a constant
    result = minimize(objective, np.full(len(a), k / len(a)), method="SLSQP",
                      bounds=[(1e-9, 1.0)] * len(a),
                      constraints=[{"type": "eq", "fun": lambda pi: pi.sum() - k}],
                      options={"ftol": 1e-12, "maxiter": 1000})
    ours = water_fill(torch.from_numpy(a), k).numpy()
    assert objective(ours) <= objective(result.x) * (1 + 1e-6)
    assert np.allclose(ours, result.x, atol=1e-3)


def test_pps_sample_has_fixed_size_and_reproduces_each_pi():
    a, k = skewed(n=20), 6
    pi = water_fill(a, k)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    for _ in range(DRAWS):
        idx, weights = pps_sample(a, k, gen)
        assert len(idx) == k and len(idx.unique()) == k
        assert torch.allclose(weights, pi[idx].reciprocal())
        counts[idx] += 1
    pi = pi.double()
    se = (DRAWS * pi * (1 - pi)).sqrt().clamp_min(1e-12)
    z = (counts.double() - DRAWS * pi) / se
    z[pi >= 1 - 1e-9] = 0.0  # certain indices: always drawn (checked below)
    assert z.abs().max() < critical_z(20)
    assert (counts[pi >= 1 - 1e-9] == DRAWS).all()


def _operands(skew: bool, seed=0, m=6, n=40, q=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen)
    y = torch.randn(n, q, generator=gen)
    if skew:
        x = x * torch.rand(n, generator=gen).pow(3) * 3
    else:  # flat: every term x[:, j] y[j, :] has the same norm
        x = x / x.norm(dim=0)
        y = y / y.norm(dim=1, keepdim=True)
    return x, y


def _draws(x, y, k, sketch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[1]
    out = []
    for _ in range(DRAWS):
        if sketch == "norm":
            idx, weights = pps_sample(contraction_importance(x, y), k, gen)
        else:
            idx, weights = uniform_subset(n, k, gen), torch.tensor(n / k)
        out.append(sampled_contraction(x, y, idx, weights))
    return torch.stack(out).double()


def test_norm_sketch_is_unbiased():
    x, y = _operands(skew=True)
    assert_unbiased_samples(_draws(x, y, 10, "norm"), x @ y)


@pytest.mark.parametrize("skew", [True, False])
def test_norm_variance_is_lower_on_skewed_terms_and_no_larger_on_flat_ones(skew):
    x, y = _operands(skew)
    norm, uniform = (_draws(x, y, 10, s) for s in ("norm", "uniform"))
    # Total variance sum_e Var_e, with its standard error from the per-draw squared deviations.
    dev = {s: (d - d.mean(0)).pow(2).flatten(1).sum(1) for s, d in (("norm", norm), ("uniform", uniform))}
    diff = dev["norm"].mean() - dev["uniform"].mean()
    se = (dev["norm"].var() / DRAWS + dev["uniform"].var() / DRAWS).sqrt()
    if skew:
        assert diff < -critical_z(1) * se  # significantly lower
        assert dev["norm"].mean() < 0.5 * dev["uniform"].mean()
    else:
        assert diff < critical_z(1) * se  # not significantly larger


def test_poisson_variance_closed_form():
    x, y = _operands(skew=True)
    _n, k = x.shape[1], 10
    pi = water_fill(contraction_importance(x, y), k)
    gen = torch.Generator().manual_seed(4)
    samples = []
    for _ in range(DRAWS):
        idx, weights = bernoulli_sample(pi, gen)
        samples.append(sampled_contraction(x, y, idx, weights.float()))
    samples = torch.stack(samples).double()
    terms = torch.einsum("mj,jq->jmq", x, y).double()
    predicted = poisson_variance(terms, pi.double())
    centred = samples - samples.mean(0)
    measured = centred.pow(2).mean(0) * DRAWS / (DRAWS - 1)
    kurtosis = centred.pow(4).mean(0) / centred.pow(2).mean(0).pow(2)
    z = (measured / predicted - 1) / ((kurtosis - 1) / DRAWS).sqrt()
    assert z.abs().max() < critical_z(z.numel()), z


def _water_fill_by_sorting(a: torch.Tensor, k: int) -> torch.Tensor:
    """The probabilities from all ``n`` sorted (a plain loop over the capped count): the reference."""
    a = torch.where(a > 0, a.clamp_min(1e-6 * a.mean()), 0.0).double()
    ordered, order = a.sort(descending=True)
    for m in range(k + 1):
        tail = ordered[m:].sum()
        if (k - m) * ordered[m] <= tail if m < len(a) else True:
            break
    pi_sorted = torch.cat([torch.ones(m, dtype=a.dtype), (ordered[m:] * (k - m) / tail).nan_to_num(0.0).clamp_max(1)])
    return torch.empty_like(a).scatter_(0, order, pi_sorted)


@pytest.mark.parametrize("case", ["skewed", "ties", "zeros", "all zero", "few positive", "one huge"])
@pytest.mark.parametrize("k", [1, 7, 30, 64])
def test_water_fill_of_the_k_largest_is_the_full_sorts(case, k):
    gen = torch.Generator().manual_seed(k)
    a = torch.rand(64, generator=gen, dtype=torch.float64).pow(6)
    a = {"skewed": a, "ties": (a * 4).round(), "zeros": torch.where(a < 0.05, 0.0, a), "all zero": a * 0,
         "few positive": torch.where(a > a.quantile(0.9), a, 0.0), "one huge": a.index_fill(0, torch.tensor([3]), 1e9)}[case]
    torch.testing.assert_close(water_fill(a, k), _water_fill_by_sorting(a, k), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("out_dim", [0, 1])
def test_output_term_norms_bound_the_output_slices(batch, out_dim):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(*batch, 12, 7, generator=gen), torch.randn(*batch, 7, 9, generator=gen)
    slices = torch.linalg.vector_norm(x @ y, dim=-1 - out_dim)  # (..., n): the norm of each output row (column)
    exact = slices.reshape(-1, slices.shape[-1]).square().sum(0).sqrt()
    bound = output_term_norms(x, y, out_dim)
    assert (bound >= exact * (1 - 1e-6)).all()
    unscaled = output_term_norms(x, y, out_dim, scaled=False)
    if not batch:  # the factor left out is common to every index
        assert torch.allclose(bound / unscaled, (bound / unscaled)[0].expand_as(bound))


def test_a_shared_draw_weighs_the_parts_of_every_product():
    """``G W`` contracts index ``j``, ``G^T A`` keeps it as output row ``j``: the shared importance
    is the root of the sum of their squared parts, positive where either is (``W[0] = 0``)."""
    gen = torch.Generator().manual_seed(0)
    g, w, a = torch.randn(16, 8, generator=gen), torch.randn(8, 5, generator=gen), torch.randn(16, 6, generator=gen)
    w[0] = 0
    alone = gemm_importances(g, w, CONTRACTED)
    assert alone[0] == 0 and (alone[1:] > 0).all()
    shared = gemm_importances(g, w, CONTRACTED, [g.t(), a], [0])
    expected = (alone.square() + output_term_norms(g.t(), a, 0).square()).sqrt()
    assert torch.allclose(shared, expected) and (shared > 0).all()
