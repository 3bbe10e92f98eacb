"""``p="auto"`` with ``grad="both"``: the propagated gradients ``G W`` under the controller, one
nested draw a step (:class:`ubcompile.auto.controller.Propagation`)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ubcompile
from ubcompile.auto import LEVELS
from ubcompile.testing import assert_unbiased, critical_z, gradient_accumulators

from conftest import loss_of, mlp
from test_syncs import syncs_after_warmup

pytestmark = pytest.mark.compiled_kernels


def controlled_ops(backend) -> dict[str, list[tuple]]:
    """Per controlled op of the backward graphs: (module, its ``upstream`` argument)."""
    ops = {"auto_contraction": [], "auto_propagated": []}
    for graph in backend.report().graphs:
        for node in graph.backward_graph.graph.nodes:
            name = getattr(node.target, "_opname", None)
            if name in ops:
                ops[name].append((node.args[4], node.args[-1]))
    return ops


def test_propagated_gradients_go_to_the_controller_with_the_draws_they_come_from():
    """Under ``grad="both"`` each hidden layer's propagated gradient is a controlled op; each
    controlled op names the propagated ones its cotangent is computed from (the pass's dataflow), and
    the layer's own weight gradient, which shares its cotangent, does not name it. The first layer
    has no propagated gradient (the input needs none)."""
    torch.manual_seed(0)
    model, x = mlp(32, 128, 128, 4), torch.randn(96, 32)
    backend = ubcompile.backend(p="auto", grad="both", min_dim=16, min_speedup=0, compiler="eager")
    loss_of(torch.compile(model, backend=backend)(x)).backward()
    ops = controlled_ops(backend)
    assert sorted(m for m, _ in ops["auto_propagated"]) == ["2", "4"]
    upstream = dict(ops["auto_contraction"])
    assert [len(upstream[m].split("/")) if upstream[m] else 0 for m in ("4", "2", "0")] == [0, 1, 2]
    assert upstream["2"] == dict(ops["auto_propagated"])["2"] != ""
    report = backend.report()
    assert sorted((e.module, e.role) for e in report.entries if e.adaptive) == [
        ("0", "grad_weight"), ("2", "grad_input"), ("2", "grad_weight"), ("4", "grad_input"), ("4", "grad_weight")]


def test_propagated_gradients_over_tokens_stay_exact():
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64))
    backend = ubcompile.backend(p="auto", grad="both", min_dim=16, min_speedup=0)
    x = torch.randn(8, 7, 24)
    torch.compile(model, backend=backend)(x).sum().backward()
    reasons = {e.reason for e in backend.report().entries if e.role == "grad_input"}
    assert len(reasons) == 1 and "tokens" in reasons.pop()


def auto_both(budget: float) -> ubcompile.backend:
    return ubcompile.backend(p="auto", grad="both", min_dim=16, min_speedup=0, budget=budget, compiler="eager",
                             seed=0)


def test_nested_propagated_draws_are_unbiased():
    """The first propagated site (the head's) draws rows; the next keeps every row left nonzero;
    each weight gradient below sees the draw: every gradient stays unbiased, and the draws ran."""
    torch.manual_seed(0)
    model = mlp(16, 64, 64, 3)
    x, target = torch.randn(128, 16), torch.randint(0, 3, (128,))
    backend = auto_both(budget=50.0)
    assert_unbiased(model, lambda out: F.cross_entropy(out, target), x, draws=200, backend=backend)
    controller = backend.sampler.auto
    group, = controller.propagation.values()
    assert not group.disabled and group.measurements >= 3  # the nesting check passes: rows stay samples
    assert f"now at {LEVELS[group.level]:g}" in controller.table()
    propagated = [s for s in controller.sites if s.family == "propagated"]
    assert len(propagated) == 2 and all(sum(s.uses[1:]) > 150 for s in propagated), [s.uses for s in propagated]


def test_weight_gradients_below_a_draw_keep_just_its_rows_and_stay_unbiased():
    """Weight sites held exact, the propagated gradients at 0.25: each weight gradient below the
    draw computes only the drawn rows (exact given them: the norm sketch keeps every nonzero row),
    at a quarter of its FLOPs, every gradient stays unbiased, and the variance the draw adds to each
    weight gradient below is the one the controller priced from the first step's measurement
    (``sum_j (1 / pi_j - 1) ||t_j||^2``, the same batch)."""
    torch.manual_seed(0)
    model = mlp(16, 64, 64, 3)
    x, target = torch.randn(128, 16), torch.randint(0, 3, (128,))
    backend = auto_both(budget=50.0)
    compiled = torch.compile(model, backend=backend)
    loss = lambda: F.cross_entropy(compiled(x), target)  # noqa: E731
    loss().backward()
    controller = backend.sampler.auto
    controller.collect(wait=True)  # the first step's measurements, allocated: then held
    group, = controller.propagation.values()
    for site in controller.sites:
        site.next_measure, site.ceiling = 10 ** 9, 0
        site.set_option(0)
    group.next_measure = 10 ** 9
    group.set_level(LEVELS.index(0.25))
    params = list(model.parameters())
    exact = torch.autograd.grad(F.cross_entropy(model(x), target), params)
    accumulators = gradient_accumulators(exact)
    spent = {s.module: s.spent_flops for s in controller.sites if s.family == "gemm"}
    draws, below = 200, {"0": [], "2": []}
    for _ in range(draws):
        grads = torch.autograd.grad(loss(), params)
        for accumulator, grad in zip(accumulators, grads):
            accumulator.add(grad)
        below["0"].append(grads[0])
        below["2"].append(grads[2])
    failed = {i: r for i, r in enumerate(a.result(1e-3) for a in accumulators) if not r.passed}
    assert not failed, failed
    priced = {s.module: s.propagation_variance for s in controller.sites if s.family == "gemm"}
    for module, grads in below.items():
        measured, variances = priced[module]
        assert measured == group.measured == 0
        # As test_profile's: a sum of many entries' variances, within its standard error, plus 10% for
        # the Poisson formula of the systematic draw.
        ratio = torch.stack(grads).var(0).sum().item() / variances[LEVELS.index(0.25)]
        assert abs(ratio - 1) < critical_z(2) * (2 / (draws - 1)) ** 0.5 + 0.10, (module, ratio)
    ratio = {s.module: (s.spent_flops - spent[s.module]) / (200 * s.costs[0])
             for s in controller.sites if s.family == "gemm"}
    assert ratio["4"] == 1 and ratio["2"] == pytest.approx(0.25) and ratio["0"] == pytest.approx(0.25), ratio


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.head(h + self.fc2(F.relu(self.fc1(h))))


def test_a_residual_connection_fails_the_nesting_check_and_turns_propagation_exact():
    """With the head left exact, the first draw is inside the residual branch (``fc2``'s); the skip
    path brings every row back below it: the input layer's weight gradient has more nonzero samples
    than the draw kept, read back later, and the model's propagated gradients run exact from then on
    (the report says why). (A draw above the branch, the head's, would stay nested: every row below
    it is a row of the drawn cotangent, scaled.)"""
    torch.manual_seed(0)
    model = ResidualMLP()
    x, target = torch.randn(128, 16), torch.randint(0, 3, (128,))
    backend = ubcompile.backend(p="auto", grad="both", min_dim=16, min_speedup=0, budget=50.0, compiler="eager",
                                seed=0, filter=lambda module: module != "head")
    compiled = torch.compile(model, backend=backend)
    for _ in range(20):
        F.cross_entropy(compiled(x), target).backward()
    controller = backend.sampler.auto
    group, = controller.propagation.values()
    assert group.disabled.startswith("inp had 128 nonzero samples") and group.level == 0, group.disabled
    assert "exact for good" in controller.table()
    fc2 = next(s for s in controller.sites if s.family == "propagated" and s.module == "fc2")
    sampled = sum(fc2.uses[1:])
    assert sampled > 0
    for _ in range(5):
        F.cross_entropy(compiled(x), target).backward()
    assert sum(fc2.uses[1:]) == sampled


class BrokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        h = F.relu(self.b(F.relu(self.a(x))))
        torch._dynamo.graph_break()
        return self.d(F.relu(self.c(h)))


def test_a_graph_break_below_a_draw_turns_propagation_exact():
    """The pass sees each graph alone: a product of another graph called after a draw may get it,
    unseen, so the controller turns the model's propagated gradients exact and says why."""
    torch.manual_seed(0)
    x, target = torch.randn(128, 32), torch.randint(0, 3, (128,))
    backend = auto_both(budget=50.0)
    compiled = torch.compile(BrokenMLP(), backend=backend)
    for _ in range(2):  # the first step measures: the draw's rows' norms reach the other graph's products
        F.cross_entropy(compiled(x), target).backward()
    group, = backend.sampler.auto.propagation.values()
    assert "graph break" in group.disabled and group.level == 0, group


def test_propagated_draws_make_no_host_sync():
    """As the weight gradients' (test_syncs): after warm-up steps that compile every body, sampled
    steps with propagated draws, nesting checks and a measurement make no sync."""
    torch.manual_seed(0)
    model = mlp(96, 128, 128, 128, 10)
    x = torch.randn(64, 96)
    backend = ubcompile.backend(p="auto", grad="both", min_dim=16, seed=0, min_speedup=0, budget=50.0)
    assert syncs_after_warmup(model, x, backend) == []
    propagated = [s for s in backend.sampler.auto.sites if s.family == "propagated"]
    assert propagated and all(sum(s.uses[1:]) >= 8 for s in propagated), [s.uses for s in propagated]
