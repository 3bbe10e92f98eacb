"""The op bodies compiled by Inductor (ubcompile.kernels) compute what the eager ones do, at every
size from one compilation."""

import pytest
import torch
from torch._dynamo.utils import counters

from ubcompile import draw_kernels

pytestmark = pytest.mark.compiled_kernels

SEED = torch.tensor(2**40 + 12345)


def both(kernel, *args):
    """``kernel``'s compiled and eager results on ``args``."""
    return kernel(*args), kernel.eager(*args)


@pytest.mark.parametrize("n, k", [(256, 64), (100, 7), (33, 33)])
def test_uniform_draws_are_the_eager_ones(n, k):
    compiled, eager = both(draw_kernels.uniform, n, k, SEED, 12345)
    assert torch.equal(compiled, eager) and len(compiled.unique()) == k


@pytest.mark.parametrize("n, k", [(256, 64), (100, 7)])
def test_pps_draws_are_the_eager_ones(n, k):
    importance = torch.rand(n, generator=torch.Generator().manual_seed(n)).square()
    (idx, weights), (eager_idx, eager_weights) = both(draw_kernels.pps, importance, k, SEED, 777)
    assert torch.equal(idx, eager_idx)
    torch.testing.assert_close(weights, eager_weights)  # float32 rounding may differ


def test_forward_row_norms_are_the_eager_ones():
    torch.testing.assert_close(*both(draw_kernels.row_norms, torch.randn(128, 48)))


@pytest.mark.parametrize("kind", ["lowrank", "gaussian"])
def test_projections_are_the_eager_ones(kind):
    anchor = torch.empty(0)
    compiled, eager = both(draw_kernels.PROJECTIONS[kind], anchor, 64, 16, SEED, 9)
    torch.testing.assert_close(compiled, eager)


def test_one_compilation_serves_every_size():
    counters.clear()
    for n, k in [(64, 16), (200, 50), (1000, 13), (4096, 1024)]:
        draw_kernels.pps(torch.rand(n), k, SEED, n)
    assert counters["stats"]["unique_graphs"] == 1


def test_equal_sizes_at_the_first_call_are_not_guarded():
    """A body first called on a square operand serves oblong ones: Dynamo's duck sizing would guard
    ``x.size(0) == x.size(1)`` and compile again (a real model's first layer is often square)."""
    counters.clear()
    for shape in [(96, 96), (128, 48), (48, 200)]:
        draw_kernels.row_norms(torch.randn(shape))
    assert counters["stats"]["unique_graphs"] == 1
