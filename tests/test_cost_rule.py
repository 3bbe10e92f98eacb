"""The cost rule (``min_speedup``): a product sampling would slow down stays exact, and says why."""

import warnings

import pytest
import torch

import ubcompile
from ubcompile.config import SamplingConfig
from ubcompile.cost_model import MODELS, CostModel, model_for, predicted_speedup
from ubcompile.passes.graph import Role
from ubcompile.passes.rules import Product, decline
from ubcompile.testing import assert_unbiased

from conftest import loss_of, mlp

pytestmark = pytest.mark.cost_rule

CPU_NORM = MODELS["cpu"]["gemm", "norm"]


def test_sampling_pays_from_a_width_that_falls_as_the_rows_grow():
    """Saved time grows as ``x y``, added time as ``x + y`` plus a constant."""
    def speedup(rows, width):
        return predicted_speedup(CPU_NORM, rows, rows // 4, width, width)

    assert speedup(1024, 64) < speedup(1024, 256) < speedup(1024, 1024)
    assert speedup(256, 256) < speedup(1024, 256) < speedup(8192, 256)
    assert speedup(1024, 64) < 1 < speedup(1024, 1024)


def test_no_model_no_rule():
    assert model_for("cuda", "gemm", "norm") is None  # not measured yet
    assert model_for("cpu", "gemm", "lowrank") is None and model_for("cpu", "gemm", "activation") is None
    narrow = Product("cuda", "gemm", s=256, x=8, y=8)
    assert decline(SamplingConfig(min_dim=16), Role.GRAD_WEIGHT, "0", 256, product=narrow) is None


@pytest.mark.parametrize("min_speedup, sampled", [(1.0, False), (0.0, True)])
def test_a_narrow_product_is_kept_exact_unless_the_rule_is_off(min_speedup, sampled):
    narrow = Product("cpu", "gemm", s=256, x=32, y=32)
    config = SamplingConfig(min_dim=16, min_speedup=min_speedup)
    reason = decline(config, Role.GRAD_WEIGHT, "0", 256, product=narrow)
    assert (reason is None) == sampled
    assert sampled or ("the exact gemm's time on cpu" in reason and "min_speedup=1" in reason)


def report(width, rows=1024, **options):
    return ubcompile.explain(mlp(width, width, width, width), torch.randn(rows, width), loss_fn=loss_of,
                             compiler="eager", **options)


def test_narrow_layers_stay_exact_and_wide_ones_are_sampled():
    narrow, wide = report(64), report(512)
    assert not narrow.sampled and all("ubcompile.cost_model" in e.reason for e in narrow.declined
                                      if e.role == "grad_weight")
    assert {e.module for e in wide.sampled} == {"0", "2", "4"}
    assert "ubcompile.cost_model" in narrow.table()


@pytest.mark.parametrize("options", [{}, {"p": "auto"}])
def test_a_patch_embedding_stays_exact_and_a_wide_convolution_is_sampled(options):
    """Convolutions are judged as implicit GEMMs by their own fitted model (under ``p="auto"``, at
    the controller's lowest fraction)."""
    def conv_report(conv, x):
        return ubcompile.explain(conv, x, loss_fn=loss_of, compiler="eager", min_dim=16, **options)

    torch.manual_seed(0)
    patches = conv_report(torch.nn.Conv2d(1, 64, 7, stride=7), torch.randn(128, 1, 28, 28))
    wide = conv_report(torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(32, 64, 28, 28))
    (patch_weight,) = [e for e in patches.declined if e.role == "conv grad_weight"]
    assert "the exact conv" in patch_weight.reason and "on cpu (ubcompile.cost_model)" in patch_weight.reason
    assert [e.role for e in wide.sampled] == ["conv grad_weight"]


def test_rows_count_too():
    """The same width-256 layers pay over 2048 rows, not over 128: the op's fixed cost."""
    assert not report(256, rows=128).sampled and report(256, rows=2048).sampled


def test_rule_off_samples_narrow_layers():
    assert len(report(64, min_speedup=0).sampled) == 3


def test_auto_keeps_exact_only_what_no_fraction_would_speed_up():
    """Under ``p="auto"`` a product is judged at the controller's lowest fraction."""
    assert not report(64, p="auto").sampled
    assert len(report(512, p="auto").sampled) == 3


def test_a_stricter_rule_keeps_more_exact():
    """At 1024 rows, width 256 pays (about 1.2x by the CPU model) but not 2x."""
    speedup = predicted_speedup(CPU_NORM, 1024, 256, 256, 256)
    assert 1 < speedup < 2
    assert report(256).sampled and not report(256, min_speedup=2).sampled


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "fast", True])
def test_min_speedup_is_validated(bad):
    with pytest.raises(ValueError, match="min_speedup"):
        SamplingConfig(min_speedup=bad)


def test_model_parts_add_up():
    model = CostModel(fixed_us=100.0, per_element_us=0.5, per_mac_us=0.01)
    assert model.exact_us(10, 20, 30) == pytest.approx(60.0)
    assert model.sampled_us(10, 5, 20, 30) == pytest.approx(100 + 0.5 * 10 * 50 + 30.0)
    assert model.sampled_us(10, 5, 20, 30, batch=2) - model.fixed_us == pytest.approx(2 * (250 + 30.0))
    # a convolution: the elements it reads, given, and an exact product partly bound by reading them
    conv = CostModel(fixed_us=100.0, per_element_us=0.5, per_mac_us=0.01, exact_per_element_us=0.25,
                     per_kept_element_us=0.125)
    assert conv.exact_us(10, 20, 30, elements=40) == pytest.approx(60.0 + 10.0)
    assert conv.sampled_us(10, 5, 20, 30, elements=40) == pytest.approx(100 + (0.5 + 0.5 * 0.125) * 40 + 0.5 * 70.0)


def test_assert_unbiased_warns_when_nothing_was_sampled():
    """A test of unbiasedness on a model the cost rule keeps exact would pass vacuously."""
    model, x = mlp(16, 32, 4), torch.randn(64, 16)
    with pytest.warns(UserWarning, match="sampled no gradient product"):
        assert_unbiased(model, loss_of, x, draws=3, backend=ubcompile.backend(compiler="eager"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sampled no gradient product")
        assert_unbiased(model, loss_of, x, draws=3, backend=ubcompile.backend(compiler="eager", min_dim=16,
                                                                          min_speedup=0))
