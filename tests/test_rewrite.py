"""Graph tests: which gradient GEMMs are rewritten, and into what shapes."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ubcompile
from ubcompile.config import SamplingConfig
from ubcompile.passes import JointSamplingPass
from ubcompile.passes.gemm import gemm_sites
from ubcompile.passes.graph import GradientFlow, cotangent_dependent

from conftest import gemm_shapes, loss_of, make, mlp

# (model, grad mode) -> (sampled, kept exact)
EXPECTED_COUNTS = {
    # The 10-way head's weight gradient samples its 64 rows; under grad="both" its 10 features are too few.
    ("mlp", "weight"): (3, 2), ("mlp", "both"): (3, 2),
    ("mlp_3d", "weight"): (3, 2), ("mlp_3d", "both"): (3, 2),
    ("frozen_first", "weight"): (2, 1), ("frozen_first", "both"): (1, 2),
    ("no_bias", "weight"): (3, 2), ("no_bias", "both"): (3, 2),
    ("mlp", "input"): (1, 4), ("mlp_3d", "input"): (1, 4), ("frozen_first", "input"): (0, 3),
    ("no_bias", "input"): (1, 4),
}


def explain(name, sketch="uniform", **options):
    model, x = make(name)
    return ubcompile.explain(model, x, loss_fn=loss_of, p=0.25, sketch=sketch, **options)


def mm_operand_shapes(report):
    (graph,) = [g.backward_graph for g in report.graphs]
    return gemm_shapes(graph)


@pytest.mark.parametrize("name, grad", sorted(EXPECTED_COUNTS))
def test_rewrite_counts(name, grad):
    report = explain(name, grad=grad)
    assert (len(report.sampled), len(report.declined)) == EXPECTED_COUNTS[name, grad], report.table()
    assert report.backward_code.count("torch.ops.ubcompile.sampled_gemm") == (
        len({e.module for e in report.sampled}))  # one draw per layer, shared under grad="both"


def test_head_declined_by_min_dim_and_listed():
    report = explain("mlp", grad="both")
    head = [e for e in report.declined if e.module == "4"]
    assert {e.role for e in head} == {"grad_input", "grad_weight"}
    assert all("below min_dim=64" in e.reason for e in head)
    assert "below min_dim=64" in report.table()


@pytest.mark.parametrize("rows, features, sampled", [(16, 128, True), (128, 16, False)])
def test_min_dim_tests_the_sampled_axis_alone(rows, features, sampled):
    """Under grad="both" the features are sampled: 16 rows do not keep 128 features exact (a
    ResNet's last stage), and 16 features stay exact however many rows there are."""
    model = torch.nn.Sequential(torch.nn.Linear(features, features), torch.nn.ReLU(), torch.nn.Linear(features, features))
    report = ubcompile.explain(model, torch.randn(rows, features), loss_fn=loss_of, p=0.25, grad="both")
    second = {e.role: e for e in report.sampled + report.declined if e.module == "2"}
    assert set(second) == {"grad_input", "grad_weight"}
    for e in second.values():
        assert (e in report.sampled) == sampled, report.table()
        assert sampled or f"spans {features} rows/columns of the GEMM, below min_dim=64" in e.reason


def test_weight_mode_keeps_grad_input_exact_and_says_so():
    report = explain("mlp", grad="weight")
    assert {e.role for e in report.sampled} == {"grad_weight"}
    assert all(e.axis == "rows" and (e.n, e.k) == (64, 16) for e in report.sampled)
    assert any(e.reason == "grad='weight' keeps grad_input exact" for e in report.declined)


def test_weight_mode_mm_shapes_use_k():
    shapes = mm_operand_shapes(explain("mlp", grad="weight"))
    assert ((128, 16), (16, 96)) in shapes and ((128, 16), (16, 128)) in shapes  # k = 16 of 64 rows
    assert ((128, 64), (64, 96)) not in shapes and ((128, 64), (64, 128)) not in shapes


def test_both_mode_mm_shapes_use_k():
    shapes = mm_operand_shapes(explain("mlp", grad="both"))
    # k = 32 of 128 features: grad_input contracts over them, grad_weight computes only their rows.
    assert {((32, 64), (64, 96)), ((64, 32), (32, 128)), ((32, 64), (64, 128))} <= shapes
    assert ((64, 128), (128, 128)) not in shapes


def test_flops_accounting():
    report = explain("mlp", grad="both")
    for e in report.sampled:
        assert e.sampled_flops * e.n == e.exact_flops * e.k
    m, k, n = report.sampled[0].shape
    assert report.sampled[0].exact_flops == 2 * m * k * n
    assert 0.25 < report.flop_ratio < 0.5


def test_p_one_rewrites_nothing():
    report = ubcompile.explain(*make("mlp"), loss_fn=loss_of, p=1.0, grad="both")
    assert not report.sampled and report.flop_ratio == 1.0
    assert "ubcompile" not in report.backward_code


def roles(report):
    return sorted((e.module, e.role, e.sampled) for e in report.entries)


def test_roles_found_by_structure_not_shape():
    """batch = in = out = 8: only where each gradient flows tells the roles apart."""
    model = mlp(8, 8, 8)
    report = ubcompile.explain(model, torch.randn(8, 8), loss_fn=loss_of, min_dim=1)
    assert roles(report) == [("0", "grad_weight", True), ("2", "grad_input", False), ("2", "grad_weight", True)]


class LeftWeight(torch.nn.Module):
    """``y = W @ x``: the parameter is the left operand, so its gradient contracts G's features."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 96) / 10)

    def forward(self, x):
        return (self.w @ x.t()).t()


def test_weight_on_the_left_is_still_a_weight_gradient():
    report = ubcompile.explain(LeftWeight(), torch.randn(128, 96), loss_fn=loss_of)
    (entry,) = report.entries
    assert (entry.role, entry.sampled, entry.axis) == ("grad_weight", True, "rows")


def test_gradient_leaving_the_graph_for_an_input_is_propagated():
    """The input gradient of a graph's first layer feeds the graph before it (a split model)."""
    model, x = make("mlp")
    report = ubcompile.explain(model, x.requires_grad_(), loss_fn=loss_of)
    first = {e.role: e for e in report.entries if e.module == "0"}
    assert not first["grad_input"].sampled and "keeps grad_input exact" in first["grad_input"].reason
    assert first["grad_weight"].sampled


def test_activation_products_are_left_exact():
    def attention_like(q, tangents_1):
        return torch.mm(tangents_1, tangents_1.t() @ q)

    graph = make_fx(attention_like)(torch.randn(8, 8), torch.randn(8, 8)).graph
    sites, unmatched = gemm_sites(graph, cotangent_dependent(graph), GradientFlow(graph))
    assert len(unmatched) == 1 and "both operands depend on the cotangent" in unmatched[0].reason


def test_uuid_covers_every_option():
    def uuid(**options):
        return JointSamplingPass(SamplingConfig(**options), lambda r: None, seed_input=0).uuid()

    variants = [uuid(), uuid(p=0.5), uuid(p="auto"), uuid(grad="both"), uuid(seed=1), uuid(min_dim=8),
                uuid(min_speedup=2), uuid(compiler="eager"), uuid(filter=lambda path: True)]
    assert len(set(variants)) == len(variants)
    assert uuid() == uuid()


def test_uuid_covers_the_cost_models(monkeypatch):
    """A device's fitted model entered at run time changes what the pass keeps exact, so its key."""
    from ubcompile import cost_model

    before = JointSamplingPass(SamplingConfig(), lambda r: None, seed_input=0).uuid()
    monkeypatch.setitem(cost_model.MODELS, "cuda", {("gemm", "norm"): cost_model.CostModel(100.0, 1e-6, 1e-9)})
    assert JointSamplingPass(SamplingConfig(), lambda r: None, seed_input=0).uuid() != before


def test_norm_sketch_draws_with_probabilities_from_the_gemm():
    report = explain("mlp", grad="both", sketch="norm")
    code = report.backward_code
    draws = [line for line in code.splitlines() if "torch.ops.ubcompile.sampled_gemm" in line]
    assert len(draws) == 2 and all("'norm'" in line for line in draws) and "'uniform'" not in code


def test_weight_gradient_on_feature_rows():
    """grad="weight", axis="features": only the kept output rows of dW are computed; dX stays exact."""
    report = explain("mlp", grad="weight", axis="features")
    assert {(e.role, e.axis, e.k, e.n) for e in report.sampled} == {("grad_weight", "features", 32, 128)}
    assert {((32, 64), (64, 96)), ((32, 64), (64, 128))} <= mm_operand_shapes(report)


def test_projection_declined_where_it_costs_more():
    report = explain("mlp", grad="both", sketch="lowrank")  # p = 0.25: three GEMMs of 1/4 each
    assert not report.sampled
    assert any("rank-32 lowrank projection costs more than the exact GEMM" in e.reason for e in report.declined)
    cheap = ubcompile.explain(*make("mlp"), loss_fn=loss_of, grad="both", sketch="lowrank", p=0.1)
    assert len(cheap.sampled) == 3 and "rank 13/128 features" in cheap.table()
    assert cheap.backward_code.count("torch.ops.ubcompile.projection") == 2 and 0.3 < cheap.flop_ratio < 0.6
