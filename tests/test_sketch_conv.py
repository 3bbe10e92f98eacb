"""The convolution and batched-matmul estimators as pure tensor functions (no graphs)."""

import pytest
import torch
import torch.nn.functional as F

import ubcompile.sketches.conv

from ubcompile.sketches import sampled_contraction, sampled_output, uniform_subset
from ubcompile.sketches.axis import Diagonal, Projection
from ubcompile.sketches.conv import (ConvGeometry, batch_sketched_vjp, channel_sketched_vjp, conv_importance, conv_vjp,
                                     sample_term_bounds, sample_weight_sq_norms)
from ubcompile.sketches.lowrank import orthonormal_sketch
from ubcompile.sketches.norm import contraction_importance
from ubcompile.testing import assert_unbiased_samples

GEOMETRIES = {
    "conv2d": (ConvGeometry((2, 1), (1, 0), (1, 2), False, (0, 0), 1), (4, 6, 9, 9), (8, 6, 3, 3)),
    "transposed": (ConvGeometry((2, 2), (1, 1), (1, 1), True, (1, 1), 1), (4, 6, 5, 5), (6, 8, 3, 3)),
    "conv1d": (ConvGeometry((1,), (2,), (1,), False, (0,), 1), (4, 6, 11), (8, 6, 5)),
}


def conv_case(name):
    geometry, x_shape, w_shape = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(*x_shape, generator=gen), torch.randn(*w_shape, generator=gen)
    out = torch.ops.aten.convolution(x, w, None, list(geometry.stride), list(geometry.padding),
                                     list(geometry.dilation), geometry.transposed, list(geometry.output_padding),
                                     geometry.groups)
    return geometry, torch.randn(out.shape, generator=gen), x, w


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("vjp, axis", [(channel_sketched_vjp, 1), (batch_sketched_vjp, 0)])
def test_keeping_everything_is_exact(name, vjp, axis):
    geometry, g, x, w = conv_case(name)
    n = g.shape[axis]
    exact = conv_vjp(g, x, w, geometry, (True, True))
    for sketch in (Diagonal(torch.arange(n), torch.tensor(1.0)), Projection(torch.eye(n))):
        got = vjp(g, x, w, sketch, geometry, (True, True))
        for a, b in zip(got, exact):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("vjp, axis", [(channel_sketched_vjp, 1), (batch_sketched_vjp, 0)])
def test_sketched_conv_vjps_are_unbiased(name, vjp, axis):
    geometry, g, x, w = conv_case(name)
    n = g.shape[axis]
    gen = torch.Generator().manual_seed(1)
    exact = conv_vjp(g, x, w, geometry, (True, True))
    draws = [vjp(g, x, w, Diagonal(uniform_subset(n, 3, gen), torch.tensor(n / 3)), geometry, (True, True))
             for _ in range(400)]
    for i, name_ in enumerate(("grad_input", "grad_weight")):
        assert_unbiased_samples(torch.stack([d[i] for d in draws]), exact[i], name=name_)


def test_a_biased_conv_estimator_fails():
    geometry, g, x, w = conv_case("conv2d")
    gen = torch.Generator().manual_seed(1)
    exact = conv_vjp(g, x, w, geometry, (True, True))[1]
    draws = torch.stack([channel_sketched_vjp(g, x, w, Diagonal(uniform_subset(8, 3, gen), torch.tensor(1.1 * 8 / 3)),
                                              geometry, (False, True))[1] for _ in range(400)])
    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased_samples(draws, exact)


def test_projected_channels_are_unbiased():
    geometry, g, x, w = conv_case("transposed")
    gen = torch.Generator().manual_seed(2)
    exact = conv_vjp(g, x, w, geometry, (True, True))
    draws = [channel_sketched_vjp(g, x, w, Projection(orthonormal_sketch(8, 3, gen)), geometry, (True, True))
             for _ in range(400)]
    for i in (0, 1):
        assert_unbiased_samples(torch.stack([d[i] for d in draws]), exact[i])


def test_batched_products_share_one_draw():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 7, 4, generator=gen)
    idx, scale = torch.tensor([1, 4, 6]), torch.tensor([2.0, 3.0, 1.5])
    for b in range(3):
        torch.testing.assert_close(sampled_contraction(x, y, idx, scale)[b], sampled_contraction(x[b], y[b], idx, scale))
        rows = torch.tensor([0, 3])
        torch.testing.assert_close(sampled_output(x, y, rows, scale[:2], 0)[b],
                                   sampled_output(x[b], y[b], rows, scale[:2], 0))
        torch.testing.assert_close(sampled_output(x, y, rows, scale[:2], 1)[b],
                                   sampled_output(x[b], y[b], rows, scale[:2], 1))
    # the batch's j-th terms stacked: sqrt(sum_b ||x_b[:, j]||^2 ||y_b[j, :]||^2)
    per_batch = torch.stack([contraction_importance(x[b], y[b]) for b in range(3)])
    torch.testing.assert_close(contraction_importance(x, y), per_batch.square().sum(0).sqrt())


def test_stratified_draw_keeps_each_group_and_is_unbiased():
    from ubcompile.sketches.uniform import stratified

    geometry = ConvGeometry((1, 1), (1, 1), (1, 1), False, (0, 0), 4)
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 8, 7, 7, generator=gen), torch.randn(16, 2, 3, 3, generator=gen)
    g = torch.randn(4, 16, 7, 7, generator=gen)
    exact = conv_vjp(g, x, w, geometry, (True, True))

    def draw():
        (idx,) = stratified(lambda _, k: (uniform_subset(4, k, gen),), 16, 8, 4)
        assert (idx // 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # two channels of each group
        return channel_sketched_vjp(g, x, w, Diagonal(idx, torch.tensor(2.0)), geometry, (True, True))

    draws = [draw() for _ in range(400)]
    for i in (0, 1):
        assert_unbiased_samples(torch.stack([d[i] for d in draws]), exact[i])


@pytest.mark.parametrize("axis, vjp", [(1, channel_sketched_vjp), (0, batch_sketched_vjp)])
def test_a_shared_conv_importance_bounds_both_gradients_parts(axis, vjp):
    """For a 1x1 convolution (a GEMM) the importance of index ``j`` bounds the norm of index ``j``'s
    part of both gradients together; with that index's co-operand zeroed (a zero filter, a zero
    sample) one gradient's part vanishes and the importance stays positive, as the other's."""
    geometry = ConvGeometry((1, 1), (0, 0), (1, 1), False, (0, 0), 1)
    gen = torch.Generator().manual_seed(0)
    x, w, g = torch.randn(4, 6, 5, 5, generator=gen), torch.randn(8, 6, 1, 1, generator=gen), torch.randn(4, 8, 5, 5, generator=gen)
    (w if axis == 1 else x)[0] = 0
    importance = conv_importance(g, x, w, axis, geometry, (True, True))
    for j in range(g.shape[axis]):
        parts = vjp(g, x, w, Diagonal(torch.tensor([j]), torch.tensor(1.0)), geometry, (True, True))
        norm = torch.linalg.vector_norm(torch.cat([part.flatten() for part in parts]))
        assert importance[j] >= norm * (1 - 1e-5), j
    assert (importance > 0).all()
    alone = conv_importance(g, x, w, axis, geometry, (axis == 1, axis == 0))  # the contracting gradient alone
    assert alone[0] == 0  # its term of index 0 is zero: never drawn for it alone, and it needs none


@pytest.mark.parametrize("transposed, groups, stride", [(False, 1, 1), (False, 2, 2), (True, 1, 2), (True, 2, 1)])
@pytest.mark.parametrize("chunk", [None, 2])
def test_sample_weight_sq_norms_are_each_samples_own_weight_gradient(transposed, groups, stride, chunk, monkeypatch):
    """The batch folded into the groups gives every sample's weight gradient, in chunks (of
    ``chunk`` samples) or not."""
    gen = torch.Generator().manual_seed(0)
    geometry = ConvGeometry((stride, stride), (1, 1), (1, 1), transposed, (0, 0), groups)
    x = torch.randn(5, 4, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(*((4, 6 // groups) if transposed else (6, 4 // groups)), 3, 3, generator=gen, dtype=torch.float64)
    conv = F.conv_transpose2d if transposed else F.conv2d
    g = torch.randn_like(conv(x, w, stride=stride, padding=1, groups=groups))
    if chunk is not None:
        monkeypatch.setattr(ubcompile.sketches.conv, "_CHUNK_ELEMENTS", chunk * w.numel())
    each = torch.stack([conv_vjp(g[b:b + 1], x[b:b + 1], w, geometry, (False, True))[1].square().sum() for b in range(5)])
    assert torch.allclose(sample_weight_sq_norms(g, x, w, geometry), each)
    # p="auto"'s draw weights: conv_importance's for the weight gradient alone, bounds on each term
    # up to the kernel's sqrt(taps) (Cauchy-Schwarz through the unfolded GEMM)
    bounds = sample_term_bounds(g, x)
    assert torch.equal(bounds, conv_importance(g, x, w, 0, geometry, (False, True)))
    assert (bounds * 3 >= each.sqrt() * (1 - 1e-9)).all()
