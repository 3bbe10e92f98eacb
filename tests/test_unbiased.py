"""Statistical unbiasedness of every rewrite, through the compiled model.

Tolerances come from the measured standard error of the mean over the draws (see
``ubcompile.testing``): the z-scores must stay below a Bonferroni bound at alpha = 1e-3.
"""

import pytest
import torch

import ubcompile
from ubcompile import draw_kernels
from ubcompile.testing import assert_unbiased

from conftest import loss_of, make

DRAWS = 200
# frozen_first under grad="input" samples nothing (its only input-gradient GEMM is the small head).
# The diagonal sketches on every model; the projections (same graph code paths) on the MLP.
CASES = [(name, grad, sketch, "inductor") for name in ("mlp", "mlp_3d", "frozen_first", "no_bias")
         for grad in ubcompile.GRAD_MODES for sketch in ("uniform", "norm")
         if (name, grad) != ("frozen_first", "input")]
CASES += [("mlp", grad, sketch, "inductor") for grad in ubcompile.GRAD_MODES for sketch in ("lowrank", "gaussian")]
CASES += [("mlp", grad, sketch, "eager") for grad in ubcompile.GRAD_MODES for sketch in ("uniform", "norm")]
# The op bodies as Inductor compiles them (the other cases run them eagerly, tests/conftest.py).
CASES += [pytest.param("mlp", grad, sketch, "inductor", marks=pytest.mark.compiled_kernels,
                       id=f"mlp-{grad}-{sketch}-compiled-kernels")
          for grad in ubcompile.GRAD_MODES for sketch in ("uniform", "norm")]


@pytest.mark.parametrize("name, grad, sketch, compiler", CASES)
def test_gradients_are_unbiased(name, grad, sketch, compiler):
    model, x = make(name)
    p = 0.1 if sketch in ("lowrank", "gaussian") else 0.25  # a projection only pays at small p
    backend = ubcompile.backend(p=p, grad=grad, sketch=sketch, seed=0, compiler=compiler)
    results = assert_unbiased(model, loss_of, x, draws=DRAWS, backend=backend)
    assert backend.report().sampled  # the test exercised at least one rewrite
    assert set(results) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
@pytest.mark.parametrize("factor", [0.25, 1.25])  # "forgot the scale n/k", "scale 25% too large"
def test_a_biased_rewrite_fails_the_same_test(monkeypatch, grad, factor):
    monkeypatch.setattr(draw_kernels, "uniform_scale", lambda n, k: factor * n / k)
    model, x = make("mlp")
    with pytest.raises(AssertionError, match="looks biased"):
        backend = ubcompile.backend(p=0.25, grad=grad, sketch="uniform", seed=0)
        assert_unbiased(model, loss_of, x, draws=DRAWS, backend=backend)


@pytest.mark.parametrize("sketch", [s for s in ubcompile.SKETCHES if s != "activation"])  # weight rows only
@pytest.mark.parametrize("grad, axis", [("weight", "features"), ("input", "rows"), ("both", "rows")])
def test_every_sketch_on_the_other_axis_is_unbiased(grad, axis, sketch):
    model, x = make("mlp")
    backend = ubcompile.backend(p=0.1, grad=grad, sketch=sketch, axis=axis, seed=0)
    assert_unbiased(model, loss_of, x, draws=DRAWS, backend=backend)
    assert {e.axis for e in backend.report().sampled} == {axis}


def zero_row_model(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Two layers, the second with its output row (filter) 0 zero: that index's input-gradient
    term ``G[:, 0] W[0]`` is zero, its weight-gradient row ``G[:, 0]^T A`` is not."""
    torch.manual_seed(0)
    if family == "linear":
        layers, x = (torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)), torch.randn(48, 32)
    else:
        layers, x = (torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)), torch.randn(8, 3, 6, 6)
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1])
    with torch.no_grad():
        model[2].weight[0] = 0
    return model, x


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("family", ["linear", "conv"])
def test_a_zero_weight_row_does_not_hide_its_gradient_from_a_shared_draw(family, compiler):
    """BERT's padding embedding, tied to its output layer: row 0 of ``W`` is zero. The layer's two
    gradients share one draw under grad="both"; it must still draw index 0 with a probability that
    the weight gradient's row earns (drawn from the input gradient's norms alone it was never drawn,
    and a floor of 1e-6 on them is unbiased in theory and never drawn in 200)."""
    model, x = zero_row_model(family)
    backend = ubcompile.backend(p=0.25, grad="both", sketch="norm", min_dim=8, seed=0, compiler=compiler)
    assert_unbiased(model, loss_of, x, draws=DRAWS, backend=backend)
    roles = ("grad_input", "grad_weight") if family == "linear" else ("conv grad_input", "conv grad_weight")
    assert {(e.module, e.role) for e in backend.report().sampled} >= {("2", role) for role in roles}
