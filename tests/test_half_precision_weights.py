"""Half precision: keep-probabilities and weights stay in float32, exactly zero terms are never drawn.

A masked (padded) cotangent row is an exactly zero term of the weight gradient. Floored to a tiny
keep-probability ``pi`` and cast to fp16, its weight ``1 / pi`` was ``inf``, and ``0 * inf = NaN``
whenever the row was drawn (issue 18, item 2).
"""

import pytest
import torch
import torch.nn as nn

import ubcompile
from ubcompile import draw_kernels
from ubcompile.sketches import sampled_contraction
from ubcompile.sketches.norm import contraction_importance, pps_sample, water_fill
from ubcompile.testing import z_scores

N, K = 256, 32
DOMINANT = 4  # rows whose importance dwarfs the others': they are capped at pi = 1


def masked_importance(dtype: torch.dtype, positive: int = 64, seed: int = 0) -> torch.Tensor:
    """``N`` importances, ``N - positive`` of them exactly zero (masked rows); of the positive ones
    ``DOMINANT`` are 1600 times the rest, so the uncapped share of ``K`` is spread over a small tail.
    Under a floor of ``1e-6`` of the mean each zero got ``pi ~ 1.2e-5``, whose reciprocal is inf in fp16."""
    gen = torch.Generator().manual_seed(seed)
    values = 1 + torch.rand(positive, generator=gen)
    values[:DOMINANT] *= 1600
    a = torch.zeros(N)
    a[torch.randperm(N, generator=gen)[:positive]] = values
    return a.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_water_fill_gives_exact_zeros_in_at_least_float32(dtype):
    a = masked_importance(dtype)
    pi = water_fill(a, K)
    assert pi.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(pi[a == 0], torch.zeros_like(pi[a == 0])), pi[a == 0].max()
    assert (pi[a > 0] > 0).all() and (pi <= 1).all()
    assert abs(pi.double().sum().item() - K) < 1e-5
    assert (pi[a > 0].reciprocal().isfinite()).all()


def test_pps_sample_never_draws_a_zero_term_and_its_weights_are_finite():
    a = masked_importance(torch.float16)
    gen = torch.Generator().manual_seed(1)
    zero_draws = infinite = 0
    for _ in range(20_000):
        idx, weights = pps_sample(a, K, gen)
        assert len(idx.unique()) == K
        zero_draws += int((a[idx] == 0).sum())
        infinite += int((~weights.isfinite()).sum())
    assert (zero_draws, infinite) == (0, 0)
    assert weights.dtype == torch.float32


@pytest.mark.parametrize("positive", [0, 20])
def test_fewer_positive_terms_than_k_are_all_kept_and_the_rest_weigh_zero(positive):
    a = masked_importance(torch.float16, positive=positive)
    assert water_fill(a, K).sum() == positive  # pi = 1 on each positive term, 0 on the zeros
    gen = torch.Generator().manual_seed(2)
    zeros_drawn = torch.zeros(N)
    for _ in range(200):
        idx, weights = pps_sample(a, K, gen)
        assert len(idx) == K and len(idx.unique()) == K  # static size K
        kept = a[idx] > 0
        assert kept.sum() == positive and torch.equal(weights, kept.float())
        zeros_drawn[idx[~kept]] += 1
    assert (zeros_drawn[a == 0] > 0).all()  # the filler is spread over the zero terms


def _ht_draws(importance_dtype: torch.dtype, factor: float, draws: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` Horvitz-Thompson estimates of ``x @ y`` whose terms are 75% exactly zero, with the
    weights ``factor / pi``; and the exact product."""
    gen = torch.Generator().manual_seed(3)
    m, n, q = 8, 64, 6
    x = torch.randn(m, n, generator=gen) * torch.rand(n, generator=gen).pow(2) * 3
    x[:, torch.randperm(n, generator=gen)[: 3 * n // 4]] = 0
    y = torch.randn(n, q, generator=gen)
    importance = contraction_importance(x.to(importance_dtype), y.to(importance_dtype))
    samples = []
    for _ in range(draws):
        idx, weights = pps_sample(importance, 6, gen)
        samples.append(sampled_contraction(x.double(), y.double(), idx, factor * weights.double()))
    return torch.stack(samples), x.double() @ y.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_horvitz_thompson_sum_with_zero_terms_is_unbiased_and_a_biased_weight_is_caught(dtype):
    result = z_scores(*_ht_draws(dtype, 1.0))
    assert result.passed, result
    biased = z_scores(*_ht_draws(dtype, 1.1))
    assert not biased.passed, biased


STEPS = 12
ROWS = 256


def _masked_loss(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A loss whose cotangent rows are exactly zero where ``keep`` is False (padded tokens)."""
    return ((out.float().tanh() * torch.linspace(-1, 1, out.shape[-1])) * keep[:, None]).sum()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_half_precision_linear_with_masked_loss_stays_finite(monkeypatch, dtype, compiler):
    """Every step's gradients are finite, no masked row can be drawn (its keep-probability is exactly
    0: the old floor gave it ``pi ~ 3e-7``, whose fp16 reciprocal is inf) and the draw's weights are float32."""
    drawn: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    pps = draw_kernels.pps

    def recording(importance, k, seed, stream):
        idx, weights = pps(importance, k, seed, stream)
        drawn.append((importance, idx, weights))
        return idx, weights

    monkeypatch.setattr(draw_kernels, "pps", recording)
    torch.manual_seed(0)
    model = nn.Linear(256, 256).to(dtype)
    compiled = torch.compile(model, backend=ubcompile.backend(p=0.25, seed=0, compiler=compiler))
    gen = torch.Generator().manual_seed(4)
    for step in range(STEPS):
        x = torch.randn(ROWS, 256, generator=gen).to(dtype)
        keep = torch.rand(ROWS, generator=gen) < 0.25  # 75% of the rows masked
        grads = torch.autograd.grad(_masked_loss(compiled(x), keep), list(model.parameters()))
        assert all(g.dtype == dtype and g.isfinite().all() for g in grads), f"step {step}"
        importance, idx, weights = drawn[-1]
        assert len(drawn) == step + 1 and weights.isfinite().all()
        masked_pi = water_fill(importance, idx.shape[0])[~keep]
        assert (importance[~keep] == 0).all() and (masked_pi == 0).all(), (
            f"step {step}: masked rows have pi up to {masked_pi.max():.2e} (1/pi = "
            f"{masked_pi.max().reciprocal()} in {masked_pi.dtype}); one is drawn with probability "
            f"{masked_pi.double().sum():.2e}")
        assert not keep[idx][weights > 0].logical_not().any()
        assert weights.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_importances_keep_tiny_terms_and_the_residual_sketch_keeps_its_dtype(dtype):
    """Term norms are float32: a product of two small half-precision norms must not round to zero
    (it would get pi = 0 and never be drawn); the residual sketch's GEMM stays in the operands' dtype."""
    from ubcompile.sketches.residual import ResidualSplit, residual_contraction

    x = torch.full((4, 8), 1e-4).to(dtype)
    assert (contraction_importance(x, x.T.contiguous()) > 0).all()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen).to(dtype), torch.randn(32, 48, generator=gen).to(dtype)
    split = ResidualSplit.of(x, y, 4, gen)
    idx, weights = pps_sample(torch.rand(32, generator=gen), 8, gen)
    assert residual_contraction(x, y, split, idx, weights).dtype == dtype
