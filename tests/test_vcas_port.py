"""The VCAS baseline (examples/vcas.py): its samplers are unbiased, its controller moves the ratios
as VCAS's rule says, and ``--vcas`` trains an example end to end."""


import pytest
import torch
import torch.nn as nn

import experiment
import fashion_vit
import vcas
from conftest import loss_of
from models import ViT, mlp
from test_examples import fashion_dir  # noqa: F401 (a fixture)
from ubcompile.testing import assert_unbiased


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny eager models: one thread is the fastest (and leaves the other cores alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FirstCallExact(nn.Module):
    """``assert_unbiased``'s model: its first call (the exact gradient) runs with VCAS off, every
    later one (the draws) samples. Dynamo is kept out: VCAS runs eagerly."""

    def __init__(self, model: nn.Module, controller: vcas.VCAS):
        super().__init__()
        self.model, self.controller, self.calls = model, controller, 0

    @torch._dynamo.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.controller.sampling = self.calls > 0
        self.calls += 1
        return self.model(x)


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(in_channels=1, image=8, patch=4, dim=16, heads=2, depth=2, classes=4)


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp([12, 32, 32, 4])


CASES = {  # model, input shape, activation ratios per block, weight ratio of every layer
    "vit activation": (tiny_vit, (16, 1, 8, 8), [0.4, 0.7], 1.0),
    "vit weight": (tiny_vit, (16, 1, 8, 8), [1.0, 1.0], 0.3),
    "vit both": (tiny_vit, (16, 1, 8, 8), [0.5, 0.5], 0.4),
    "mlp both": (tiny_mlp, (32, 12), [0.3, 0.5], 0.3),
}


def sampled(case: str) -> tuple[FirstCallExact, torch.Tensor]:
    build, shape, act_ratios, w_ratio = CASES[case]
    model = build()
    controller = vcas.wrap(model, seed=1)
    controller.act_ratios = act_ratios
    controller.w_ratios = [w_ratio] * len(controller.w_ratios)
    torch.manual_seed(2)
    return FirstCallExact(model, controller), torch.randn(*shape)


@pytest.mark.parametrize("case", CASES)
def test_samplers_are_unbiased(case):
    model, x = sampled(case)
    assert_unbiased(model, loss_of, x, backend="eager")
    assert model.controller.saved_flops > 0  # something was sampled


def test_a_biased_variant_fails_the_check(monkeypatch):
    """Keeping the most probable samples and tokens deterministically (still scaled by ``1 / p``)
    instead of drawing them is biased."""
    monkeypatch.setattr(vcas.VCAS, "_draw", lambda self, p: p >= p.median())
    model, x = sampled("vit both")
    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(model, loss_of, x, backend="eager")


def test_keep_probabilities_sum_to_k_capped_at_one():
    scores = torch.tensor([10.0, 1.0, 1.0, 1.0, 0.0])
    assert torch.allclose(vcas.keep_probabilities(scores, 2), torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3, 0.0]))
    assert vcas.top_fraction(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.7) == 0.5  # 4 + 3 >= 0.7 * 10


def test_the_update_follows_vcas_rule():
    controller = vcas.wrap(tiny_mlp())  # blocks: the two hidden layers; layers: those two (the head stays exact)
    assert (len(controller.act_ratios), len(controller.w_ratios)) == (2, 2)
    controller.s, controller.act_ratios, controller.w_ratios = 0.9, [0.5, 0.6], [0.5, 0.5]
    too_noisy = vcas.Measurement(sgd_var=[1.0, 1.0], act_var=[0.04, 0.02], w_var=[0.03, 0.02],
                                 ratios_below=[0.7, 0.4], ratios_above=[0.9, 0.8])
    controller.update(too_noisy)  # 0.06 > 0.025 * 2: s up, the ratios toward those measured at s - 0.01
    assert controller.s == pytest.approx(0.91)
    assert controller.act_ratios == pytest.approx([0.6 * 0.5 + 0.4 * 0.7, 0.6 * 0.6 + 0.4 * 0.7])  # made monotone
    assert controller.w_ratios == pytest.approx([0.5 / 0.95, 0.5 * 0.95])  # 0.03 > 0.025, 0.02 < 0.025
    quiet = vcas.Measurement(sgd_var=[1.0, 1.0], act_var=[0.01, 0.01], w_var=[0.0, 0.0],
                             ratios_below=[0.7, 0.4], ratios_above=[0.9, 0.8])
    controller.update(quiet)  # s down, the ratios toward those measured at s + 0.01
    assert controller.s == pytest.approx(0.90)
    assert controller.act_ratios == pytest.approx([0.6 * 0.58 + 0.4 * 0.9, 0.6 * 0.64 + 0.4 * 0.9])


@pytest.mark.parametrize("tau, direction", [(float("inf"), -1), (0.0, 1)])
def test_a_measurement_moves_the_ratios(tau, direction):
    """Measured on a tiny MLP: at an infinite threshold every ratio falls, at zero every ratio rises."""
    torch.manual_seed(3)
    data = [(torch.randn(32, 12), torch.randint(0, 4, (32,))) for _ in range(8)]
    model = tiny_mlp()
    config = vcas.VCASConfig(every=1, act_tau=tau, w_tau=tau)
    controller = vcas.wrap(model, config=config, exact_flops=1.0, seed=0)
    controller.s, controller.act_ratios, controller.w_ratios = 0.5, [0.5, 0.5], [0.5, 0.5]
    controller.sampling = True
    measured = controller.measure(lambda b: experiment.loss_fn(model(b[0]), b[1]), iter(data))
    assert all(v > 0 for v in measured.sgd_var + measured.act_var + measured.w_var)
    controller.update(measured)
    assert controller.s == pytest.approx(0.5 + direction * 0.01)
    assert all((r - 0.5) * direction > 0 for r in controller.w_ratios)
    assert controller.passes == 2 + 2 * 2


def test_vcas_trains_an_example_and_records_it(fashion_dir):  # noqa: F811
    argv = ["--data-dir", str(fashion_dir), "--dim", "32", "--depth", "1", "--batch", "64", "--epochs", "0.75",
            "--vcas", "--threads", "1", "--no-progress"]
    args = experiment.parse_args(argv, fashion_vit.__doc__, fashion_vit.LR, fashion_vit.EPOCHS,
                                 fashion_vit.OPTIMIZER, fashion_vit.add_arguments)
    record = experiment.run(fashion_vit.build_task(args), args)
    assert record["label"] == "vcas" and record["status"] == "ok" and record["config"]["vcas"]
    assert [p["step"] for p in record["curve"]] == [0, 3]
    assert {"epoch", "time_s", "bwd_gflop", "acc", "loss"} <= set(record["curve"][-1])
    info, flops = record["vcas"], record["bwd_gflop_per_step"]
    assert info["config"]["every"] == 1 and len(info["measurements"]) == 3  # 3 steps: min(100, 3 // 50), at least 1
    assert info["backward_passes"] == 3 * (1 + 2 + 4)
    assert flops["sampled"] == pytest.approx(info["flop_ratio"] * flops["exact"])
    assert 0 < flops["sampled"] < info["backward_passes"] / 3 * flops["exact"]


@pytest.mark.parametrize("other", [["--exact"], ["--p", "0.25"]])
def test_vcas_excludes_exact_and_p(other):
    with pytest.raises(SystemExit):
        experiment.parse_args(["--vcas"] + other, fashion_vit.__doc__, 0.1, 1)
