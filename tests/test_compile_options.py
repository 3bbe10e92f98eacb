"""torch.compile's own arguments with this backend: ``options=``, ``mode=``, and a user's joint pass
kept (issue 20, item 3)."""

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import ubcompile

from conftest import loss_of, mlp


def weight_grads(compiled, model, x):
    return torch.autograd.grad(loss_of(compiled(x)), [p for p in model.parameters() if p.requires_grad])


def setup():
    model = mlp(96, 128, 128, 10)
    torch.manual_seed(1)
    return model, torch.randn(64, 96)


def test_options_configure_the_string_backend():
    model, x = setup()
    exact = weight_grads(torch.compile(model, backend="inductor"), model, x)
    torch._dynamo.reset()
    same = weight_grads(torch.compile(model, backend="ubcompile", options={"p": 1.0}), model, x)
    torch._dynamo.reset()
    sampled = weight_grads(torch.compile(model, backend="ubcompile", options={"p": 0.5, "min_dim": 16}), model, x)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(same, exact))
    assert not torch.allclose(sampled[0], exact[0], rtol=1e-3, atol=1e-4)


def test_an_unknown_option_names_the_valid_ones():
    model, x = setup()
    with pytest.raises(Exception, match="unknown ubcompile option.*'q'.*the options are p, grad"):
        torch.compile(model, backend="ubcompile", options={"q": 0.5})(x)


def test_options_are_refused_for_a_configured_backend_object():
    model, x = setup()
    with pytest.raises(Exception, match=r"pass them to ubcompile.backend"):
        torch.compile(model, backend=ubcompile.backend(), options={"p": 0.5})(x)


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "max-autotune"])
def test_inductor_modes_compile_and_sample(mode):
    model, x = setup()
    backend = ubcompile.backend(min_dim=16)
    if mode == "max-autotune":
        with pytest.warns(RuntimeWarning, match="without its CUDA graphs"):
            weight_grads(torch.compile(model, backend=backend, mode=mode), model, x)
    else:
        weight_grads(torch.compile(model, backend=backend, mode=mode), model, x)
    assert backend.report().sampled


@pytest.mark.parametrize("options", [{}, {"grad": "both", "sketch": "uniform"}, {"grad": "both", "sketch": "lowrank", "p": 0.1},
                                     {"sketch": "activation"}, {"p": "auto"}])
def test_every_mode_compiles_one_whole_graph(options):
    """``fullgraph=True``: the sampled ops, the seed input and the controlled op break no graph, in any mode."""
    model, x = setup()
    backend = ubcompile.backend(min_dim=16, **options)
    weight_grads(torch.compile(model, backend=backend, fullgraph=True), model, x)
    assert backend.report().sampled and len(backend.graphs) == 1


@pytest.mark.parametrize("options, mode, message", [
    ({}, "reduce-overhead", "CUDA graphs, which cannot replay"),
    ({"compiler": "eager"}, "max-autotune", "compiler='eager' runs the graphs op by op"),
])
def test_modes_that_cannot_apply_are_refused_with_the_reason(options, mode, message):
    model, x = setup()
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend=ubcompile.backend(**options), mode=mode)(x)


class Counting(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting"


def test_a_users_joint_pass_runs_alongside():
    model, x = setup()
    user = Counting()
    backend = ubcompile.backend(min_dim=16)
    with torch._inductor.config.patch(joint_custom_pre_pass=user):
        weight_grads(torch.compile(model, backend=backend), model, x)
    assert user.calls == 1 and backend.report().sampled
