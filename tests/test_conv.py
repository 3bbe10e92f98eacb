"""Convolution gradients: which are sampled under each mode, into what shapes, and unbiasedness."""

import functools

import pytest
import torch

import ubcompile
from ubcompile import draw_kernels
from ubcompile.sketches import keep_count
from ubcompile.testing import assert_unbiased

from conftest import inner_calls, loss_of
from zoo import DRAWS, make_zoo, zoo_loss

CONV_GRADS = ("conv grad_input", "conv grad_weight")


@functools.lru_cache(maxsize=None)
def conv_report(grad, axis, sketch="norm", p=0.25):
    model, x = make_zoo("conv_kinds")
    torch._dynamo.reset()
    return ubcompile.explain(model, x, loss_fn=zoo_loss, p=p, grad=grad, axis=axis, sketch=sketch, min_dim=8)


def by_layer(report):
    return {(e.module, e.role): e for e in report.entries if e.role in CONV_GRADS}


def conv_backward_operands(report):
    """``(G shape, x shape, w shape, output_mask)`` of every convolution backward the backward graph runs."""
    (graph,) = [g.backward_graph for g in report.graphs]
    return [(*(tuple(a.shape) for a in args[:3]), tuple(args[10]))
            for _, args in inner_calls(graph, (torch.ops.aten.convolution_backward.default,))]


def test_channel_sampling_covers_every_geometry_and_stratifies_groups():
    layers = by_layer(conv_report("both", "features"))
    for name in ("dilated", "grouped", "transposed", "conv1d", "conv3d"):
        for role in CONV_GRADS:
            assert (layers[name, role].k, layers[name, role].n) == (8, 32), (name, role)
    assert ("plain", "conv grad_input") not in layers  # the input needs no gradient
    assert layers["plain", "conv grad_weight"].sampled
    # depthwise: one channel per group, nothing to leave out
    assert layers["depthwise", "conv grad_input"].reason == "p=0.25 keeps all 32 features (1 in each of 32 groups)"


def test_channel_sampling_runs_convolutions_with_k_channels():
    operands = conv_backward_operands(conv_report("both", "features"))
    sampled = [ops for ops in operands if ops[0][1] == 8]
    # plain, dilated, grouped (2 of 8 channels in each of 4 groups), transposed, conv1d, conv3d:
    # G and w cut to the 8 kept channels.
    assert len(sampled) == 6
    assert all(8 in w[:2] for _, _, w, _ in sampled)  # w's output-channel dim (1 if transposed)
    assert any(len(g) == 3 for g, *_ in sampled) and any(len(g) == 5 for g, *_ in sampled)


def test_batch_sampling_of_weight_gradients_works_with_groups():
    report = conv_report("weight", "rows")
    layers = by_layer(report)
    for name in ("plain", "dilated", "grouped", "depthwise", "transposed", "conv1d", "conv3d"):
        assert (layers[name, "conv grad_weight"].k, layers[name, "conv grad_weight"].axis) == (4, "rows")
    assert all(not e.sampled and e.reason == "grad='weight' keeps grad_input exact"
               for (_, role), e in layers.items() if role == "conv grad_input")
    operands = conv_backward_operands(report)
    weight_only = [ops for ops in operands if ops[3][:2] == (False, True)]
    assert len(weight_only) == 7 and all(g[0] == 4 and x[0] == 4 for g, x, _, _ in weight_only)
    # the exact input gradients keep their own full-batch calls, narrowed to grad_input and the bias
    assert all(g[0] == 16 for g, _, _, mask in operands if mask[0])


def test_conv_flops_follow_k():
    report = conv_report("both", "features")
    sampled = [e for e in report.sampled if e.role in CONV_GRADS]
    assert all(e.sampled_flops == e.exact_flops * e.k // e.n for e in sampled)


CASES = [("weight", "rows", "norm"), ("weight", "features", "uniform"), ("input", "features", "norm"),
         ("both", "features", "norm"), ("both", "rows", "norm"), ("weight", "rows", "lowrank"),
         ("both", "features", "gaussian")]


@pytest.mark.parametrize("grad, axis, sketch", CASES)
def test_conv_gradients_are_unbiased(grad, axis, sketch):
    model, x = make_zoo("conv_kinds")
    backend = ubcompile.backend(p=0.25, grad=grad, axis=axis, sketch=sketch, min_dim=8, seed=0)
    assert_unbiased(model, zoo_loss, x, draws=DRAWS, backend=backend)
    assert any(e.role in CONV_GRADS for e in backend.report().sampled)


def test_a_biased_conv_rewrite_fails_the_same_test(monkeypatch):
    monkeypatch.setattr(draw_kernels, "uniform_scale", lambda n, k: 1.25 * n / k)
    model, x = make_zoo("bagnet")
    backend = ubcompile.backend(p=0.25, grad="weight", axis="rows", sketch="uniform", min_dim=8, seed=0)
    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(model, zoo_loss, x, draws=DRAWS, backend=backend)


def test_a_dynamic_batch_keeps_its_own_fraction_of_samples():
    """Batch sampling under a dynamic batch: each size keeps ceil(p * batch) samples of the input
    gradient (the draw's k follows the symbolic batch, not the size the graph was compiled at)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3)
    backend = ubcompile.backend(p=0.25, grad="both", axis="rows", min_dim=1, seed=0)
    compiled = torch.compile(conv, backend=backend)
    for batch in (8, 12, 16, 20):
        x = torch.randn(batch, 8, 10, 10, requires_grad=True)
        loss_of(compiled(x)).backward()
        assert int(x.grad.flatten(1).ne(0).any(1).sum()) == keep_count(batch, 0.25), batch
    assert any("Sym(" in graph.backward_code for graph in backend.report().graphs)  # a dynamic graph served sizes
