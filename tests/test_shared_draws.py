"""Draws shared between rewrites of one cotangent: keyed by what they draw, defined before every user.

A cotangent ``G`` of shape ``(B, C, L)`` that feeds a ``bmm`` and a ``conv1d`` is sampled along two
different dims under one ``axis``: a GEMM's features are ``G``'s last dim (``L``), a convolution's
its channels (``C``). Each family needs its own draw (issue 18.1).
"""

import pytest
import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx

import ubcompile
from ubcompile.config import SamplingConfig
from ubcompile.estimator_ops import sampled_size
from ubcompile.passes import JointSamplingPass
from ubcompile.passes import joint_pass as joint_pass_module
from ubcompile.passes.conv import ConvRewrite, conv_sites, plan_conv
from ubcompile.passes.gemm import GemmRewrite, gemm_sites, plan_gemm
from ubcompile.passes.graph import GradientFlow, cotangent_dependent
from ubcompile.passes.inline import inline_call
from ubcompile.passes.rules import Draws
from ubcompile.passes.seed_input import seed_node
from ubcompile.sketches import keep_count
from ubcompile.testing import assert_unbiased_samples, gradient_draws

from conftest import loss_of

BATCH = 4
P = 0.25
DRAWS = 1000  # grad="both" estimates are heavy-tailed: at 200 draws the mean is not yet normal enough for the z-test (one case reached max |z| 4.36 at 200 draws, 1.35 at 1000, same seed)
MIN_DIM = 4  # every product of the tests' models is sampled
SAMPLED_GEMM = torch.ops.ubcompile.sampled_gemm.default
DRAWING = {SAMPLED_GEMM: "bmm", torch.ops.ubcompile.sampled_conv_backward.default: "conv"}  # op -> family
ESTIMATORS = {torch.ops.ubcompile.sketched_gemm.default: ("bmm", 2),  # family, position of the indices
              torch.ops.ubcompile.sketched_conv_backward.default: ("conv", 3)}


class BmmPlusConv(nn.Module):
    """``bmm(a, x) + conv1d(x)`` for ``x`` of shape ``(B, C, L)``: one cotangent for both products.

    The backward runs in reverse order of the forward: ``first`` names the product whose gradients
    come first in the joint graph, which the forward computes last."""

    def __init__(self, channels: int, first: str) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(BATCH, channels, channels) / channels**0.5)
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.first = first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first == "bmm":
            return self.conv(x) + torch.bmm(self.a, x)
        return torch.bmm(self.a, x) + self.conv(x)


def make(channels: int, length: int, first: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = BmmPlusConv(channels, first)
    return model, torch.randn(BATCH, channels, length, requires_grad=True)


def draw_size(draw: torch.fx.Node) -> tuple[int, int]:
    """``(n, k)`` of a drawing op: ``sampled_gemm(x, y, out_dim, sketch, k, ...)`` or
    ``sampled_conv_backward(g, x, w, <6 geometry args>, axis, mask, sketch, k, ...)``."""
    if draw.target is SAMPLED_GEMM:
        x, y = (a.meta["val"] for a in draw.args[:2])
        return sampled_size(x, y, draw.args[2]), draw.args[4]
    return draw.args[0].meta["val"].shape[draw.args[9]], draw.args[12]


def drawn_sizes(graph: torch.fx.GraphModule) -> dict[str, set[tuple[int, int]]]:
    """``(n, k)`` of the draw each estimator op of the backward ``graph`` makes or reads, by family."""
    sizes: dict[str, set[tuple[int, int]]] = {"bmm": set(), "conv": set()}
    for node in graph.graph.nodes:
        if node.target in DRAWING:  # draws for itself
            sizes[DRAWING[node.target]].add(draw_size(node))
        elif node.target in ESTIMATORS:
            family, position = ESTIMATORS[node.target]
            sizes[family].add(draw_size(node.args[position].args[0]))  # getitem(drawing op, index)
    return sizes


def reported_sizes(report: ubcompile.Report) -> dict[str, set[tuple[int, int]]]:
    """``(n, k)`` of the report's sampled entries, by family."""
    return {family: {(e.n, e.k) for e in report.sampled if e.role.startswith(family)} for family in ("bmm", "conv")}


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("channels, length, first", [(128, 64, "bmm"), (64, 128, "bmm"), (128, 64, "conv")])
def test_bmm_and_conv_on_one_cotangent_draw_their_own_axes(channels, length, first, compiler):
    model, x = make(channels, length, first)
    tensors = {**dict(model.named_parameters()), "input": x}
    exact = torch.autograd.grad(loss_of(model(x)), list(tensors.values()))
    backend = ubcompile.backend(p=P, grad="both", min_dim=MIN_DIM, seed=0, compiler=compiler)
    compiled = torch.compile(model, backend=backend)
    samples = dict(zip(tensors, gradient_draws(lambda: loss_of(compiled(x)), list(tensors.values()), DRAWS)))

    report = backend.report()
    (graph,) = report.graphs
    assert len(report.sampled) == 4, report.table()  # both gradients of both products, none fell back
    code = graph.joint_code
    first_gemm = min(code.find(op) for op in ("sampled_gemm", "sketched_gemm") if op in code)
    assert (code.index("_conv_backward") < first_gemm) == (first == "conv")
    assert reported_sizes(report) == {"bmm": {(length, keep_count(length, P))},
                                      "conv": {(channels, keep_count(channels, P))}}
    assert drawn_sizes(graph.backward_graph) == reported_sizes(report)
    kept_channels = samples["conv.weight"].flatten(2).ne(0).any(2).any(0)
    assert kept_channels.all(), f"output channels never sampled: {(~kept_channels).nonzero().flatten().tolist()}"
    for name, exact_grad in zip(tensors, exact):
        assert_unbiased_samples(samples[name], exact_grad, name=f"gradient of {name}")


SEED_INPUT = 3  # joint_like's seed, as the backend appends it to a graph's inputs


def joint_like(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor, seed: torch.Tensor, tangents_1: torch.Tensor) -> tuple:
    """The backward of ``bmm(a, x) + conv1d(x, w)`` given its cotangent ``tangents_1``."""
    grads = torch.ops.aten.convolution_backward.default(tangents_1, x, w, [w.shape[0]], [1], [1], [1], False,
                                                        [0], 1, [True, True, True])
    return torch.bmm(tangents_1, x.transpose(1, 2)), torch.bmm(a.transpose(1, 2), tangents_1), *grads


def planned(axis: str) -> tuple[torch.fx.Graph, list[GemmRewrite], ConvRewrite]:
    """The joint-like graph (C=16, L=8), the rewrites of its two bmm and its convolution under ``axis``."""
    channels, length = 16, 8
    example = (torch.randn(BATCH, channels, channels), torch.randn(BATCH, channels, length),
               torch.randn(channels, channels, 3), torch.zeros((), dtype=torch.int64), torch.randn(BATCH, channels, length))
    graph = make_fx(joint_like, tracing_mode="fake")(*example).graph
    dependent, flow = cotangent_dependent(graph), GradientFlow(graph)
    config = SamplingConfig(p=P, grad="both", axis=axis, min_dim=1)
    gemms, _ = gemm_sites(graph, dependent, flow)
    (conv,) = conv_sites(graph, dependent, flow)
    return graph, [plan_gemm(site, config) for site in gemms], plan_conv(conv, config)[0]


@pytest.mark.parametrize("axis, gemm_dim, conv_dim", [("features", 2, 1), ("rows", 1, 0)])
def test_gemm_and_conv_draw_keys_on_one_cotangent_differ(axis, gemm_dim, conv_dim):
    _, gemms, conv = planned(axis)
    (gemm_key,) = {rewrite.draw_key for rewrite in gemms}  # the bmm's two gradients share one draw
    assert gemm_key.cotangent is conv.draw_key.cotangent
    assert (gemm_key.dim, conv.draw_key.dim) == (gemm_dim, conv_dim)
    assert gemm_key != conv.draw_key


def test_a_shared_draw_defined_after_its_user_keeps_that_gradient_exact():
    graph, _, conv = planned("features")
    node = conv.site.node
    seed = seed_node(graph, SEED_INPUT)
    with graph.inserting_before(graph.output_node()):  # the convolution's draw, after the convolution
        _, late = inline_call(graph, conv.drawing_estimator(0), [*node.args[:3], seed], meta_from=node)
    draws = Draws(seed)
    draws[conv.draw_key] = late
    joint_pass = JointSamplingPass(SamplingConfig(p=P, grad="both", min_dim=1), lambda report: None,
                                   seed_input=SEED_INPUT)
    reason = joint_pass._guarded(graph, node, draws, lambda: joint_pass._rewrite_conv(graph, conv, draws))
    assert reason is not None and "defined after" in reason, reason
    graph.lint()
    assert node in list(graph.nodes)  # the convolution backward still computes both gradients
    assert not any(n.target is torch.ops.ubcompile.sketched_conv_backward.default for n in graph.nodes)


def test_sites_are_rewritten_in_graph_order():
    """The convolution backward comes first in the joint-like graph: it is rewritten (and reported) first."""
    graph, _, _ = planned("features")
    reports = []
    JointSamplingPass(SamplingConfig(p=P, grad="both", min_dim=1), reports.append, seed_input=SEED_INPUT)(graph)
    (report,) = reports
    assert [e.role.split()[0] for e in report.entries] == ["conv", "conv", "bmm", "bmm"]
    assert all(e.sampled for e in report.entries)


def linear_joint(x: torch.Tensor, w: torch.Tensor, seed: torch.Tensor, tangents_1: torch.Tensor) -> tuple:
    """The backward of ``x @ w^T`` given its cotangent: ``G^T``, which the weight gradient reads,
    is computed after the input gradient's product."""
    return torch.mm(tangents_1, w), torch.mm(tangents_1.t(), x)


def linear_plans(sketch: str) -> tuple[torch.fx.Graph, list]:
    example = (torch.randn(32, 16), torch.randn(24, 16), torch.zeros((), dtype=torch.int64), torch.randn(32, 24))
    graph = make_fx(linear_joint, tracing_mode="fake")(*example).graph
    config = SamplingConfig(p=P, grad="both", sketch=sketch, min_dim=1)
    gemms, _ = gemm_sites(graph, cotangent_dependent(graph), GradientFlow(graph))
    return graph, [plan_gemm(site, config) for site in gemms]


def drawing_ops(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [node for node in graph.nodes if node.target is SAMPLED_GEMM]


def test_a_norm_draw_shared_by_a_layers_two_gradients_reads_both_products():
    """The weight gradient's ``G^T`` is moved before the input gradient's op, which draws from both
    products' operands (the probabilities of ``ubcompile.estimator_ops.gemm_importances``)."""
    graph, (grad_input, grad_weight) = linear_plans("norm")
    operands = list(grad_weight.site.node.args)  # (G^T, x); the pass erases the node
    assert not operands[0] < grad_input.site.node
    JointSamplingPass(SamplingConfig(p=P, grad="both", sketch="norm", min_dim=1), lambda report: None,
                      seed_input=2)(graph)
    (draw,) = drawing_ops(graph)
    shared, shared_dims = draw.args[7:9]
    assert shared == operands and operands[0] < draw
    assert shared_dims == [grad_weight.op_dim]


def test_a_uniform_draw_reads_no_other_product():
    graph, _ = linear_plans("uniform")
    JointSamplingPass(SamplingConfig(p=P, grad="both", sketch="uniform", min_dim=1), lambda report: None,
                      seed_input=2)(graph)
    (draw,) = drawing_ops(graph)
    assert draw.args[7:9] == ([], [])


def test_a_product_whose_operands_cannot_precede_the_shared_draw_stays_exact(monkeypatch):
    monkeypatch.setattr(joint_pass_module, "hoist", lambda node, before: False)
    graph, _ = linear_plans("norm")
    reports = []
    JointSamplingPass(SamplingConfig(p=P, grad="both", sketch="norm", min_dim=1), reports.append,
                      seed_input=2)(graph)
    (report,) = reports
    assert [e.sampled for e in report.entries] == [True, False]
    assert "kept exact" in report.entries[1].reason
    (draw,) = drawing_ops(graph)
    assert draw.args[7:9] == ([], [])  # it draws for itself alone
