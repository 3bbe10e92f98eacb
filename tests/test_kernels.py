"""The op bodies compiled by Inductor (ubcompile.kernels) compute what the eager ones do, at every
size from one compilation."""

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from ubcompile import draw_kernels, estimator_ops
from ubcompile.auto import AutoController
from ubcompile.auto.execution import measurement

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


def compilations(body) -> int:
    """How many graphs Dynamo holds for a compiled body (:func:`ubcompile.kernels.kernel`)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(body.eager.__code__))


def test_a_weight_operand_of_any_shape_shares_one_compilation():
    """A propagated gradient ``G W`` hands the layer's weight, an ``nn.Parameter``, to the GEMM body.
    Dynamo traces parameters at static sizes unless told otherwise, and compiled the body again for
    every weight shape of a model: 5-10 s each on this CPU (a ViT-B block: 4 shapes)."""
    with torch.no_grad():
        for rows, features, inputs in [(96, 80, 64), (96, 200, 48), (128, 72, 32)]:
            weight = torch.nn.Parameter(torch.randn(features, inputs))
            estimator_ops.drawn_product(torch.randn(rows, features), weight, estimator_ops.CONTRACTED, "uniform",
                                        features // 4, SEED, 3, [], [])
    assert compilations(estimator_ops.drawn_product) == 1


def test_one_measurement_compilation_serves_sites_with_and_without_the_residual_sketch():
    """Each site's first call measures; a narrow site has no residual sketch and a wide one has. The
    body once took the residual importances as a second argument, which the narrow site filled with
    its norm importances again: Dynamo compiled it a second time for the tensor passed twice."""
    gen = torch.Generator().manual_seed(0)
    c = AutoController(budget=1.0, measure_every=10)
    for index, (m, n, big_n) in enumerate([(32, 128, 16), (256, 128, 256)]):
        site = c.register(f"layer{index}", (m, n, big_n))
        c.contraction(torch.randn(m, n, generator=gen), torch.randn(n, big_n, generator=gen), site,
                      torch.randint(0, 2**62, (), generator=gen), index)
    assert [any(o.sketch == "residual" for o in s.options) for s in c.sites] == [False, True]
    assert compilations(measurement) == 1


def test_the_kept_rows_of_a_transposed_cotangent_are_written_in_its_storage_order():
    """The weight gradient ``G^T A`` keeps rows of ``G``, which ``G^T`` holds as whole storage rows.
    The compiled body must write them so (``k x d``, row-major) and hand the GEMM a transposed view:
    written in ``G^T``'s dim order, each kept row was scattered element by element into a ``d x k``
    buffer, and the op took 1.7x as long on an 8192-row, width-1024 gradient (benchmarks/RESULTS.md)."""
    g, a = torch.randn(512, 96), torch.randn(512, 80)
    _, (code,) = run_and_get_code(estimator_ops.drawn_product, g.t(), a, estimator_ops.CONTRACTED, "uniform",
                                  128, SEED, 3, [], [])
    gemm = re.search(r"extern_kernels\.mm\((.*)\)", code).group(1)
    assert gemm.startswith("reinterpret_tensor("), gemm
