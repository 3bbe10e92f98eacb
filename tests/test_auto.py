"""``p="auto"``: the variance estimates, the controller's choices, the spike guard, the rewrite."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ubcompile
from ubcompile.passes import adaptive
from ubcompile.auto import BASES_EVERY, LEVELS, AutoController, allocate, lower_hull, site_options
from ubcompile.sketches import keep_count
from ubcompile.sketches.control import sample_sq_norms, sgd_variance, sketch_variance_vector, sketch_variances
from ubcompile.sketches.norm import water_fill
from ubcompile.sketches.residual import tracked_bases
from ubcompile.testing import assert_unbiased, critical_z

from conftest import mlp


@pytest.mark.parametrize("m, big_n, group", [(6, 5, 1), (6, 5, 3), (2, 3, 8), (40, 50, 4)])
def test_sample_sq_norms_match_the_per_sample_products(m, big_n, group):
    """Rank-one, Gram and batched-product forms all give ``||x[:, rows_i] @ y[rows_i]||^2``."""
    gen = torch.Generator().manual_seed(0)
    n = 5 * group
    x, y = torch.randn(m, n, generator=gen), torch.randn(n, big_n, generator=gen)
    direct = torch.stack([(x[:, i:i + group] @ y[i:i + group]).double().square().sum() for i in range(0, n, group)])
    assert torch.allclose(sample_sq_norms(x, y, group), direct, rtol=1e-5)


@pytest.mark.parametrize("zeros", [0, 8, 26])
def test_sketch_variances_are_the_poisson_formula_and_zero_when_all_kept(zeros):
    """All keep counts at once are :func:`water_fill`'s, one count at a time; with zero terms too,
    and with fewer nonzero terms than some counts keep (26 zeros of 30)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(30, generator=gen).pow(3)
    a[torch.randperm(30, generator=gen)[:zeros]] = 0
    ks = [30, 12, 3, 7]
    got = sketch_variances(a, ks)
    assert got[0] == 0.0
    for k, v in zip(ks[1:], got[1:]):
        pi = water_fill(a.double(), k)
        weight = torch.where(pi > 0, 1 / pi - 1, 0.0)
        assert v == pytest.approx(float((weight * a.double() ** 2).sum()), rel=1e-9, abs=1e-300)
    assert got[1] <= got[3] <= got[2]


def test_sketch_variances_weigh_the_terms_norms_where_the_draw_has_other_weights():
    """Drawn from bounds ``a_j`` on the terms (a convolution's samples), the variance is
    ``sum_j (1 / pi_j - 1) ||t_j||^2`` with ``pi`` from ``a``: neither formula of one alone."""
    gen = torch.Generator().manual_seed(2)
    norms = torch.rand(20, generator=gen, dtype=torch.float64)
    bounds = norms * (1 + 3 * torch.rand(20, generator=gen, dtype=torch.float64))
    got = sketch_variance_vector(bounds, torch.tensor([5, 20]), norms).tolist()
    pi = water_fill(bounds, 5)
    assert got == [pytest.approx(float(((1 / pi - 1) * norms.square()).sum()), rel=1e-9), 0.0]
    assert got[0] != pytest.approx(sketch_variances(bounds, [5])[0], rel=1e-3)
    assert got[0] != pytest.approx(sketch_variances(norms, [5])[0], rel=1e-3)


def _minibatch_variance_z(biased: bool) -> float:
    """z-score of the mean of ``sgd_variance`` over many minibatches against the true variance of
    the minibatch gradient ``T = sum_i v_i / b`` (``b`` samples drawn with replacement)."""
    gen = torch.Generator().manual_seed(0)
    population = torch.randn(500, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 0.7
    b, draws = 4, 4000
    true = float(population.var(0, unbiased=False).sum()) / b
    estimates = []
    for _ in range(draws):
        s = population[torch.randint(0, 500, (b,), generator=gen)] / b
        total = float(s.sum(0).square().sum())
        sq = s.square().sum(1)
        estimates.append(float(sq.sum()) - total / b if biased else sgd_variance(sq, total))
    est = torch.tensor(estimates)
    return float((est.mean() - true) / (est.std() / draws**0.5))


def test_sgd_variance_is_unbiased_and_a_biased_version_is_caught():
    """Without the ``b / (b - 1)`` correction (a 25% bias at b = 4) the same test fails."""
    bound = critical_z(1)
    assert abs(_minibatch_variance_z(biased=False)) <= bound
    assert abs(_minibatch_variance_z(biased=True)) > bound


def _levels(variances, flops=1.0):
    """Options of a site whose norm-sketch levels have these variances: ``(FLOPs saved, variance)``."""
    return [(flops * (1 - p), v) for p, v in zip(LEVELS, variances)]


def test_allocate_one_site_takes_the_most_aggressive_fit():
    variances = (0.0, 0.2, 0.6, 1.5, 3.0, 5.0, 9.0, 20.0)
    assert allocate([_levels(variances)], 1.0) == [2]
    assert allocate([_levels(variances[:2])], 1.0) == [1]
    assert allocate([_levels(variances)], 0.1) == [0]
    assert allocate([_levels(variances)], 100.0) == [len(LEVELS) - 1]


def test_allocate_spends_the_shared_budget_where_it_saves_most():
    """Site 0 is noisy when sampled, site 1 nearly free: the shared allowance (the sum of two
    per-layer budgets of 1) goes to site 1, which a per-layer budget of 1 would have held back."""
    noisy = (0.0, 2.5, 5.0, 8.0, 12.0, 16.0, 24.0, 40.0)
    quiet = (0.0, 0.1, 0.2, 0.4, 0.8, 1.2, 1.9, 3.0)
    levels = allocate([_levels(noisy), _levels(quiet)], 2.0)
    assert levels == [0, 6]  # per layer: noisy exact, quiet at level 4 (0.8 <= 1 < 1.2)
    assert noisy[levels[0]] + quiet[levels[1]] <= 2.0
    # a cheap first step of a noisy site can be worth more than the last steps of a quiet one
    assert allocate([_levels((0.0, 1.5, 9.0, 9, 9, 9, 9, 9)), _levels(quiet)], 2.0) == [1, 3]
    # FLOPs matter too: at equal variances the bigger product moves first
    assert allocate([_levels(quiet), _levels(quiet, flops=4.0)], 0.2) == [0, 2]


def test_allocate_skips_options_off_the_lower_hull():
    """Option 1 saves less than option 2 for more variance, option 3 lies above the chord from
    option 2 to option 4: neither is ever chosen, whatever the allowance."""
    options = [(0.0, 0.0), (1.0, 3.0), (2.0, 1.0), (3.0, 2.5), (4.0, 3.0), (5.0, 10.0)]
    assert lower_hull(options) == [0, 2, 4, 5]
    chosen = {allocate([options], allowance)[0] for allowance in (0.5, 1.0, 2.0, 2.9, 3.0, 9.0, 10.0)}
    assert chosen == {0, 2, 4, 5}


def test_site_offers_the_residual_sketch_only_where_it_can_pay():
    wide, tokens, narrow = (site_options(shape) for shape in ((1024, 256, 1024), (64, 2176, 192), (10, 256, 1024)))
    assert sum(o.sketch == "residual" for o in wide) == len(LEVELS) - 1
    assert all(o.flops(1024, 256, 1024) < wide[0].flops(1024, 256, 1024) for o in wide[1:])
    # many rows, few features: the bases (2 r n (M + N) (1 + 2 + 1) FLOPs) cost 2/3 of exact's product
    assert all(o.sketch == "norm" for o in tokens + narrow)


def test_options_are_priced_in_time_where_the_device_has_fitted_models(monkeypatch):
    """With the controlled call's cost models (:mod:`ubcompile.cost_model`), an option predicted
    slower than exact is never offered and the allocation weighs microseconds saved; without them
    (no device, or none fitted) the options and their FLOPs are as before."""
    from ubcompile import cost_model
    from ubcompile.auto import AutoSite
    from ubcompile.auto.policy import option_times

    shape = (1024, 256, 1024)
    by_flops = site_options(shape)
    assert site_options(shape, "cpu") == by_flops  # conftest: no fitted models
    slow_residual = {("auto", "norm"): cost_model.CostModel(100.0, 1e-4, 1e-5),
                     ("auto", "residual"): cost_model.CostModel(100.0, 1e-1, 1e-5)}
    monkeypatch.setitem(cost_model.MODELS, "cpu", slow_residual)
    timed = site_options(shape, "cpu")
    assert [o for o in by_flops if o.sketch == "norm"] == list(timed)  # every norm level saves time here
    site = AutoSite("m", shape, device="cpu")
    exact, times = option_times(site.options, shape, "cpu")
    assert site.savings == tuple(exact - t for t in times) and site.savings[0] == 0
    assert list(site.savings) == sorted(site.savings)  # fewer rows kept, more time saved
    flops_site = AutoSite("m", shape)
    assert flops_site.savings == tuple(flops_site.costs[0] - c for c in flops_site.costs)
    too_slow = {key: cost_model.CostModel(1e9, 0.0, 1e-5) for key in slow_residual}
    monkeypatch.setitem(cost_model.MODELS, "cpu", too_slow)
    assert [o.label for o in site_options(shape, "cpu")] == ["exact"]
    assert site_options(shape, "cpu", min_speedup=0) == by_flops  # the rule off: FLOPs, every option
    assert AutoSite("m", shape, device="cpu", min_speedup=0).savings == flops_site.savings


def test_a_convolution_site_is_priced_by_the_elements_it_reads(monkeypatch):
    """A convolution's controlled call reads ``G`` and ``x`` once each (``reads`` per sample), not
    the unfolded input its implicit GEMM's sizes count (9 times ``x`` for a 3x3)."""
    from ubcompile import cost_model
    from ubcompile.auto.policy import conv_site_shape, option_times

    shape, span, reads = conv_site_shape((8, 16, 10, 10), (8, 4, 10, 10), (16, 4, 3, 3), False)
    assert (shape, span, reads) == ((16, 8, 100 * 36), 100, 16 * 100 + 4 * 100)
    reading = cost_model.CostModel(fixed_us=0.0, per_element_us=1.0, per_mac_us=0.0, exact_per_element_us=1.0)
    monkeypatch.setitem(cost_model.MODELS, "cpu", {("auto_conv", "norm"): reading})
    options = site_options(shape, "cpu", min_speedup=0, family="conv", span=span, reads=reads)
    exact, times = option_times(options, shape, "cpu", "conv", span, reads)
    assert exact == 8 * reads
    assert times == tuple(exact if o.level == 0 else exact + exact * min(8, keep_count(8, o.p)) / 8 for o in options)


def _seed(gen):
    """A call's 0-d seed, as the backend's stream gives one."""
    return torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, generator=gen)


def _call(controller, x, y, gen, times=1):
    for _ in range(times):
        out = controller.contraction(x, y, 0, _seed(gen), 0)
    return out


def test_controller_samples_noise_dominated_products_and_keeps_exact_when_the_budget_is_tiny():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 256, generator=gen), torch.randn(256, 32, generator=gen)  # pure noise gradient
    loose, tight = AutoController(budget=4.0, measure_every=10), AutoController(budget=1e-3, measure_every=10)
    for c in (loose, tight):
        c.register("layer", (64, 256, 32))
        _call(c, x, y, gen, times=30)
    # noise-dominated: V_sketch / V_sgd is close to 1/p - 1: 3 at p = 0.25 fits budget 4, 4.6 at p = 0.18 does not
    assert loose.sites[0].p == 0.25
    assert loose.spent_flops < 0.5 * loose.exact_flops
    assert tight.sites[0].p == 1.0 and tight.spent_flops == tight.exact_flops
    assert "option used" in loose.table()


@pytest.mark.parametrize("scale", ["global", "layer"])
def test_a_layer_scaled_budget_weighs_each_layer_by_its_own_gradient(scale):
    """Two noise-dominated layers alike but for a 10x larger gradient in one. Summed as they are
    (``"global"``), the small layer's variances are 100x cheaper: it takes the most aggressive
    fraction and the large one stays exact. Each over its own ``||T||^2`` (``"layer"``), they are
    the same layer and get the same fraction."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 256, generator=gen), torch.randn(256, 32, generator=gen)
    c = AutoController(budget=1.0, measure_every=10, budget_scale=scale)
    big, small = c.register("big", (64, 256, 32)), c.register("small", (64, 256, 32))
    for _ in range(30):
        c.contraction(x, 10 * y, big, _seed(gen), 0)
        c.contraction(x, y, small, _seed(gen), 1)
    c.collect(wait=True)
    levels = [c.sites[big].current.level, c.sites[small].current.level]
    assert levels == ([0, len(LEVELS) - 1] if scale == "global" else [levels[0]] * 2)
    assert levels[0] > 0 or scale == "global"


def test_residual_bases_serve_a_few_calls_then_are_tracked_and_made_anew_at_measurements():
    """A site on the residual sketch makes its bases at its first call (a measurement) and then
    carries them forward every :data:`BASES_EVERY` calls by one power iteration on the call's data;
    operands of another dtype get bases of their own."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 128, generator=gen), torch.randn(128, 256, generator=gen)
    c = AutoController(budget=4.0, measure_every=50)
    c.register("layer", (256, 128, 256))
    site = c.sites[0]
    made, bases = [], []
    for call in range(12):
        c.contraction(x, y, 0, _seed(gen), 0)
        made.append(site.bases_made)
        bases.append(site.bases)
        if call == 0:
            c.collect(wait=True)  # the measurement's allocation, then an option of our own
            site.set_option(next(i for i, o in enumerate(site.options) if o.sketch == "residual" and o.level == 3))
            site.next_measure = 10**6  # no measurement: every refresh below is the schedule's
    assert made == [0] * BASES_EVERY + [BASES_EVERY] * BASES_EVERY + [2 * BASES_EVERY] * 2
    for got, want in zip(bases[BASES_EVERY], tracked_bases(x, y, *bases[0])):
        assert torch.allclose(got, want, atol=1e-5)
    c.contraction(x.double(), y.double(), 0, _seed(gen), 0)
    assert site.bases[0].dtype == torch.float64 and site.bases_made == 12


def test_a_gradient_spike_falls_back_towards_exact():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 256, generator=gen), torch.randn(256, 32, generator=gen)
    c = AutoController(budget=4.0, measure_every=10)
    c.register("layer", (64, 256, 32))
    _call(c, x, y, gen, times=60)
    site = c.sites[0]
    before = site.current.level
    assert before > 0 and not site.spikes
    c.contraction(x, 10 * y, 0, _seed(gen), 0)  # the gradient's norm jumps 10x: a loss spike
    assert not site.spikes  # read back without a sync: the controller sees it from the next call on
    out = c.contraction(x, 10 * y, 0, _seed(gen), 0)
    assert site.spikes == [60]
    assert torch.allclose(out, x @ (10 * y), rtol=1e-4)  # the call after the spike is computed exactly
    assert site.ceiling == before - 1 and site.current.level <= before - 1


def input_grads_agree(model: nn.Module, x: torch.Tensor, backend) -> bool:
    """Whether one backward of ``model`` compiled with ``backend`` gives the input exact Inductor's gradient."""
    grads = []
    for compiler in (backend, "inductor"):
        inputs = x.clone().requires_grad_()
        torch.compile(model, backend=compiler)(inputs).square().sum().backward()
        grads.append(inputs.grad)
    return torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_auto_backend_hands_weight_gradients_to_the_controlled_op():
    """Weight gradients go to the controller; the propagated ones (layers 2 and 4: layer 0's is not
    needed) stay the graph's exact products, and the input's gradient is exact Inductor's."""
    torch.manual_seed(0)
    model, x = mlp(32, 128, 128, 4), torch.randn(96, 32)
    backend = ubcompile.backend(p="auto", min_dim=16)
    exact_input_grad = input_grads_agree(model, x, backend)
    report = backend.report()
    assert sorted((e.module, e.role) for e in report.entries if e.adaptive) == [
        ("0", "grad_weight"), ("2", "grad_weight"), ("4", "grad_weight")]
    assert {e.reason for e in report.entries if e.role == "grad_input"} == {
        adaptive.PROPAGATED}
    assert sorted(s.module for s in backend.sampler.auto.sites) == ["0", "2", "4"]
    assert report.backward_code.count("ubcompile.auto_contraction.default(") == 3
    assert "auto/96 rows" in str(report) and "option used" in str(report)
    assert exact_input_grad


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 36, 5))


def test_convolution_weight_gradients_go_to_the_controller():
    """Each convolution's weight gradient is a controlled op over its batch; their input gradients
    (the first one's too: the input requires one) stay in the node, exact; the bias gradients move
    out to sums, and the input's gradient is exact Inductor's."""
    torch.manual_seed(0)
    model, x = conv_net(), torch.randn(32, 3, 16, 16)
    backend = ubcompile.backend(p="auto", min_dim=4, min_speedup=0)
    exact_input_grad = input_grads_agree(model, x, backend)
    report = backend.report()
    assert sorted((e.module, e.role) for e in report.entries if e.adaptive) == [
        ("0", "conv grad_weight"), ("2", "conv grad_weight"), ("5", "grad_weight")]
    assert [e.reason for e in report.entries if e.role == "conv grad_input"] == [
        adaptive.PROPAGATED_CONV] * 2
    assert report.backward_code.count("ubcompile.auto_conv_weight.default(") == 2
    sites = {s.module: s for s in backend.sampler.auto.sites}
    assert (sites["2"].family, sites["2"].shape, sites["2"].span) == ("conv", (32, 32, 36 * 16 * 9), 36)
    assert all(o.sketch == "norm" for o in sites["2"].options)
    assert exact_input_grad


def grouped_transposed_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, groups=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=2), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(8 * 25 * 25, 5))


@pytest.mark.parametrize("net", [conv_net, grouped_transposed_net])
def test_auto_convolution_gradients_are_unbiased(net):
    """The draw's weights are bounds on the samples' terms, not their norms: unbiased all the same,
    grouped and transposed convolutions too."""
    torch.manual_seed(0)
    model = net()
    x, target = torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,))
    backend = ubcompile.backend(p="auto", min_dim=4, budget=4.0, compiler="eager", seed=0, min_speedup=0)
    assert_unbiased(model, lambda out: F.cross_entropy(out, target), x, draws=200, backend=backend)
    uses = {s.module: s.uses for s in backend.sampler.auto.sites if s.family == "conv"}
    assert len(uses) == (2 if net is conv_net else 3) and all(sum(u[1:]) > 150 for u in uses.values()), uses


def test_tokens_per_sequence_are_found_for_the_sgd_variance():
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64))
    backend = ubcompile.backend(p="auto", min_dim=16)
    torch.compile(model, backend=backend)(torch.randn(8, 7, 24)).sum().backward()
    assert [s.group for s in backend.sampler.auto.sites] == [7, 7]


@pytest.mark.parametrize("widths, budget, residual", [((16, 64, 64, 3), 4.0, False), ((16, 512, 512, 3), 1.0, True)])
def test_auto_gradients_are_unbiased(widths, budget, residual):
    """Each call's option depends only on earlier calls, so every gradient stays unbiased; the
    512 x 512 layer is wide enough for the residual sketch, and the controller uses it."""
    torch.manual_seed(0)
    model = mlp(*widths)
    x, target = torch.randn(128, 16), torch.randint(0, 3, (128,))
    backend = ubcompile.backend(p="auto", min_dim=16, budget=budget, compiler="eager", seed=0)
    assert_unbiased(model, lambda out: F.cross_entropy(out, target), x, draws=200, backend=backend)
    sites = backend.sampler.auto.sites
    # Most calls sampled (option 0: exact). Under budget 1.0 the 3-way head's sampling would save
    # too few FLOPs for its variance, and the controller keeps it exact.
    assert all(sum(s.uses[1:]) > 150 for s in sites if s.module != "4" or budget > 1), [(s.module, s.uses) for s in sites]
    used = {s.module: sum(u for o, u in zip(s.options, s.uses) if o.sketch == "residual") for s in sites}
    assert (used["2"] > 0) == residual, used


@pytest.mark.parametrize("options, message", [
    (dict(grad="input"), "grad='weight' or 'both'"),
    (dict(sketch="uniform"), "sketch='norm'"),
    (dict(budget=0), "budget"),
    (dict(measure_every=0), "measure_every"),
])
def test_auto_config_errors_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        ubcompile.backend(p="auto", **options)




class ClassTokenReadout(nn.Module):
    """Token-wise layers, then a head on token 0 only: the last layer's cotangent is zero on every other token."""

    def __init__(self, dim: int = 32, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                  nn.Linear(width, width))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)[:, 0])


def test_with_a_budget_too_small_to_sample_every_gradient_is_exact():
    """A class-token readout: the last layers' cotangents are zero off token 0."""
    torch.manual_seed(0)
    model, x = ClassTokenReadout(), torch.randn(16, 8, 32)
    backend = ubcompile.backend(p="auto", budget=1e-9, min_dim=16, compiler="eager")
    torch.compile(model, backend=backend)(x).square().sum().backward()
    sampled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    assert all(torch.allclose(s, p.grad, rtol=1e-4, atol=1e-6) for s, p in zip(sampled, model.parameters()))
