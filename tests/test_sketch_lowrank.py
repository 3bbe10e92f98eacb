"""Rank-constrained sketches: unbiased projections, and the Gaussian closed-form variance."""

import pytest
import torch

from ubcompile.sketches.lowrank import (gaussian_sketch, gaussian_total_variance, orthonormal_sketch,
                                        projected_contraction, projected_output)
from ubcompile.testing import assert_unbiased_samples, critical_z

DRAWS = 2000
SKETCHES = {"gaussian": gaussian_sketch, "orthonormal": orthonormal_sketch}


def operands(m=5, n=30, q=4):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, n, generator=gen, dtype=torch.float64), torch.randn(n, q, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", SKETCHES)
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_projection_estimators_are_unbiased(name, dim):
    x, y = operands()
    gen = torch.Generator().manual_seed(1)
    n = {None: x.shape[1], 0: x.shape[0], 1: y.shape[1]}[dim]
    k = max(1, n // 4)

    def draw():
        omega = SKETCHES[name](n, k, gen, dtype=torch.float64)
        return projected_contraction(x, y, omega) if dim is None else projected_output(x, y, omega, dim)

    assert_unbiased_samples(torch.stack([draw() for _ in range(DRAWS)]), x @ y)


def test_orthonormal_sketch_has_orthonormal_columns():
    omega = orthonormal_sketch(30, 6, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(omega.T @ omega, torch.eye(6, dtype=torch.float64) * 30 / 6)


@pytest.mark.parametrize("k", [3, 10])
def test_gaussian_variance_closed_form(k):
    x, y = operands()
    gen = torch.Generator().manual_seed(2)
    err = torch.stack([(projected_contraction(x, y, gaussian_sketch(30, k, gen, dtype=torch.float64)) - x @ y)
                       .square().sum() for _ in range(DRAWS)])
    predicted = gaussian_total_variance(x, y, k)
    z = (err.mean() - predicted) / (err.std() / DRAWS**0.5)
    assert abs(z) < critical_z(1), (err.mean(), predicted)
