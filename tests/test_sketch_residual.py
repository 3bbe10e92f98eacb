"""The residual sketch: exact low-rank part plus the norm sketch on the rest."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ubcompile.sketches.matmul import sampled_contraction
from ubcompile.sketches.norm import contraction_importance, factor_norms, pps_sample
from ubcompile.sketches.residual import (ResidualSplit, coordinate_flops, fused_product, orthonormal_pair, reduced_product,
                                         residual_contraction, residual_flops, split_flops)
from ubcompile.testing import assert_unbiased_samples, critical_z, z_scores

M, N_ROWS, N, RANK, K, DRAWS = 24, 40, 20, 4, 8, 2000


def _operands(noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s columns and ``y``'s rows near 3-dimensional subspaces (a classifier's gradient rows
    and activations), plus ``noise``; term norms spread over two orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-1, 1, N_ROWS)[torch.randperm(N_ROWS, generator=gen)]
    x = (torch.randn(M, 3, generator=gen) @ torch.randn(3, N_ROWS, generator=gen)
         + noise * torch.randn(M, N_ROWS, generator=gen)) * scale
    y = torch.randn(N_ROWS, 3, generator=gen) @ torch.randn(3, N, generator=gen) + noise * torch.randn(N_ROWS, N, generator=gen)
    return x.double(), y.double()


def _draws(x, y, estimate) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.stack([estimate(x, y, gen) for _ in range(DRAWS)])


def residual(x, y, gen):
    split = ResidualSplit.of(x, y, RANK, gen)
    return residual_contraction(x, y, split, *pps_sample(split.importance(*factor_norms(x, y)), K, gen))


def plain(x, y, gen):
    return sampled_contraction(x, y, *pps_sample(contraction_importance(x, y), K, gen))


def double_counted(x, y, gen):
    """Deliberately biased: adds ``P_U T P_V`` a second time (the correction term left out)."""
    split = ResidualSplit.of(x, y, RANK, gen)
    out = residual_contraction(x, y, split, *pps_sample(split.importance(*factor_norms(x, y)), K, gen))
    return out + split.u @ (split.xu @ split.yv) @ split.v.mT


def test_keeping_every_term_is_exact():
    x, y = _operands()
    split = ResidualSplit.of(x, y, RANK, torch.Generator().manual_seed(2))
    assert torch.allclose(residual_contraction(x, y, split, torch.arange(N_ROWS), 1.0), x @ y)


def test_exact_when_the_terms_lie_in_the_bases():
    x, y = _operands(noise=0.0)
    split = ResidualSplit.of(x, y, RANK, torch.Generator().manual_seed(2))
    assert split.importance(*factor_norms(x, y)).max() < 1e-6 * contraction_importance(x, y).max()
    idx, weights = pps_sample(split.importance(*factor_norms(x, y)), K, torch.Generator().manual_seed(3))
    assert torch.allclose(residual_contraction(x, y, split, idx, weights), x @ y)


def test_residual_sketch_is_unbiased_and_a_double_counted_part_is_caught():
    x, y = _operands()
    assert_unbiased_samples(_draws(x, y, residual), x @ y)
    assert not z_scores(_draws(x, y, double_counted), x @ y).passed


def test_bases_made_from_other_data_keep_the_estimate_unbiased():
    """``p="auto"`` reuses a site's bases on later batches: any bases leave the estimator unbiased."""
    x, y = _operands()
    other_x, other_y = _operands(noise=1.0)
    bases = ResidualSplit.of(other_x[:, :17], other_y[:17], RANK, torch.Generator().manual_seed(6))

    def stale(x, y, gen):
        split = ResidualSplit.on_bases(x, y, bases.u, bases.v)
        return residual_contraction(x, y, split, *pps_sample(split.importance(*factor_norms(x, y)), K, gen))

    assert_unbiased_samples(_draws(x, y, stale), x @ y)


def test_residual_variance_is_far_below_the_norm_sketch_near_low_rank():
    """Total variance at the same ``k``, with the standard error of its difference."""
    x, y = _operands()
    dev = {f.__name__: (d - x @ y).pow(2).flatten(1).sum(1) for f in (residual, plain) for d in [_draws(x, y, f)]}
    diff = dev["residual"].mean() - dev["plain"].mean()
    se = (dev["residual"].var() / DRAWS + dev["plain"].var() / DRAWS).sqrt()
    assert diff < -critical_z(1) * se
    assert dev["residual"].mean() < 0.1 * dev["plain"].mean()


@pytest.mark.parametrize("rows", [(24, 40), (40, 24), (16, 16)])
def test_one_batched_qr_gives_each_factor_of_its_own_qr(rows):
    """Zero rows padded below leave each ``Q`` factor that of its own matrix (signs included)."""
    gen = torch.Generator().manual_seed(7)
    a, b = (torch.randn(n, RANK, generator=gen, dtype=torch.float64) for n in rows)
    for q, t in zip(orthonormal_pair(a, b), (a, b)):
        assert torch.allclose(q, torch.linalg.qr(t).Q, atol=1e-12)


def test_fused_and_reduced_products_are_the_matrix_product():
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(M, RANK, generator=gen, dtype=torch.float64), torch.randn(RANK, N, generator=gen, dtype=torch.float64)
    assert torch.allclose(fused_product(a, b), a @ b)
    assert torch.allclose(reduced_product(a.mT, a), a.mT @ a) and torch.allclose(reduced_product(b, b.mT), b @ b.mT)


@pytest.mark.parametrize("power", [0, 1, 2])
def test_flops_are_what_the_gemms_count(power):
    x, y = _operands()
    gen = torch.Generator().manual_seed(4)
    with FlopCounterMode(display=False) as split_count:
        split = ResidualSplit.of(x, y, RANK, gen, power)
    idx, weights = pps_sample(split.importance(*factor_norms(x, y)), K, gen)
    with FlopCounterMode(display=False) as apply_count:
        residual_contraction(x, y, split, idx, weights)
    # not GEMMs: the coordinates (reduced_product), the kept rows' correction and the core's u side (fused_product)
    reduced, fused = coordinate_flops(M, N_ROWS, N, RANK), 2 * RANK * K * N + 2 * RANK * RANK * M
    assert split_count.get_total_flops() + reduced == split_flops(M, N_ROWS, N, RANK, power)
    assert (split_count.get_total_flops() + apply_count.get_total_flops() + reduced + fused
            == residual_flops(M, N_ROWS, N, RANK, K, power))


def test_half_precision_operands_get_their_bases_in_float32():
    x, y = (t.bfloat16() for t in _operands())
    split = ResidualSplit.of(x, y, RANK, torch.Generator().manual_seed(5))
    assert split.u.dtype == split.v.dtype == torch.bfloat16
    out = residual_contraction(x, y, split, torch.arange(N_ROWS), 1.0)
    assert torch.allclose(out.double(), (x @ y).double(), rtol=0.05, atol=0.05 * (x @ y).abs().max().item())
