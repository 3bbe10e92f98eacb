"""Modes a training run goes through: train/eval, no_grad and inference_mode, changing batch sizes,
low-precision dtypes and autocast. Tiny models and ``compiler="eager"`` keep it fast; one test
checks the Inductor path."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import pytest
import torch
import torch.nn as nn

import ubcompile
from ubcompile.testing import z_scores

from conftest import loss_of, mlp


def counting(backend: Callable[..., Any]) -> tuple[Callable[..., Any], list[torch.fx.GraphModule]]:
    """``backend`` wrapped to record every graph Dynamo hands it (one entry per compilation)."""
    compiled: list[torch.fx.GraphModule] = []

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        compiled.append(gm)
        return backend(gm, example_inputs)

    return compile_graph, compiled


def grads(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``loss_of(fn(x))`` with respect to ``model``'s parameters."""
    return list(torch.autograd.grad(loss_of(fn(x)), list(model.parameters())))


def equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def with_dropout() -> nn.Sequential:
    """An MLP whose forward reads ``training`` (a dropout, of rate 0 so that runs compare), so Dynamo
    guards on it by itself."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.0), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 8))


@pytest.mark.parametrize("make_model", [lambda: mlp(64, 128, 128, 8), with_dropout], ids=["plain", "dropout"])
def test_eval_mode_gets_exact_gradients_and_train_mode_samples(make_model):
    model, x = make_model(), torch.randn(64, 64)
    backend = ubcompile.backend(p=0.25, seed=0, compiler="eager")
    counted, compiled_graphs = counting(backend)
    compiled = torch.compile(model, backend=counted)
    for _ in range(2):  # switching back and forth compiles each mode once
        model.eval()
        assert equal(grads(compiled, model, x), grads(model, model, x))
        model.train()
        assert not equal(grads(compiled, model, x), grads(model, model, x))
    assert len(compiled_graphs) == 2 and len(backend.graphs) == 1  # only the training graph is sampled


def test_sample_in_eval_opts_in_without_recompiling():
    model, x = mlp(64, 128, 128, 8), torch.randn(64, 64)
    counted, compiled_graphs = counting(ubcompile.backend(p=0.25, seed=0, compiler="eager", sample_in_eval=True))
    compiled = torch.compile(model, backend=counted)
    grads(compiled, model, x)
    model.eval()
    assert not equal(grads(compiled, model, x), grads(model, model, x))
    assert len(compiled_graphs) == 1


def test_sample_in_eval_must_be_a_bool():
    with pytest.raises(TypeError, match="sample_in_eval must be a bool, got 'yes'"):
        ubcompile.backend(sample_in_eval="yes")


def test_inductor_eval_mode_is_exact():
    model, x = mlp(64, 128, 128, 8), torch.randn(64, 64)
    compiled = torch.compile(model, backend=ubcompile.backend(p=0.25, seed=0))
    exact = grads(model, model, x)
    assert not all(torch.allclose(s, e, rtol=1e-3, atol=1e-4) for s, e in zip(grads(compiled, model, x), exact))
    model.eval()
    for s, e in zip(grads(compiled, model, x), exact):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-5)


def test_compiled_function_follows_the_module_it_is_given():
    model, x = mlp(64, 128, 128, 8), torch.randn(64, 64)
    criterion = nn.MSELoss()  # a parameterless module stays in training mode: the model decides

    def step(net: nn.Module, loss: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return loss(net(inputs), torch.zeros(inputs.shape[0], 8))

    compiled = torch.compile(step, backend=ubcompile.backend(p=0.25, seed=0, compiler="eager"))
    params = list(model.parameters())
    exact = torch.autograd.grad(step(model, criterion, x), params)
    assert not equal(torch.autograd.grad(compiled(model, criterion, x), params), exact)
    model.eval()
    assert equal(torch.autograd.grad(compiled(model, criterion, x), params), exact)


def test_function_without_a_module_is_sampled_silently(recwarn):
    torch.manual_seed(0)
    w, x = torch.randn(128, 96, requires_grad=True), torch.randn(64, 128)
    compiled = torch.compile(lambda a, b: (a @ b).tanh(), backend=ubcompile.backend(p=0.25, seed=0, compiler="eager"))
    sampled = torch.autograd.grad(loss_of(compiled(x, w)), [w])
    assert not equal(sampled, torch.autograd.grad(loss_of((x @ w).tanh()), [w]))
    assert not [w for w in recwarn if "ubcompile" in str(w.message)]


def test_unknown_frame_warns_and_samples(monkeypatch):
    """If Dynamo's frame cannot be seen (its internals moved), eval mode is sampled, never silently."""
    monkeypatch.setattr(importlib.import_module("ubcompile.backend"), "compiling_frame_modules", lambda: None)
    model, x = mlp(64, 128, 128, 8), torch.randn(64, 64)
    model.eval()
    compiled = torch.compile(model, backend=ubcompile.backend(p=0.25, seed=0, compiler="eager"))
    with pytest.warns(RuntimeWarning, match="samples this graph even if its module is in eval"):
        sampled = grads(compiled, model, x)
    assert not equal(sampled, grads(model, model, x))


GLOBAL_MODEL = mlp(64, 128, 128, 8)


def test_global_model_warns_and_samples():
    """A function that reads its model from a global: the module is not among the frame's locals."""
    x = torch.randn(64, 64)
    GLOBAL_MODEL.eval()
    compiled = torch.compile(lambda inputs: GLOBAL_MODEL(inputs),
                             backend=ubcompile.backend(p=0.25, seed=0, compiler="eager"))
    with pytest.warns(RuntimeWarning, match="found no nn.Module among the compiled frame's local variables"):
        sampled = grads(compiled, GLOBAL_MODEL, x)
    assert not equal(sampled, grads(GLOBAL_MODEL, GLOBAL_MODEL, x))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("training", [True, False])
def test_forward_without_gradients_is_exact(mode, training):
    model, x = mlp(64, 128, 128, 8), torch.randn(64, 64)
    model.train(training)
    backend = ubcompile.backend(p=0.25, seed=0, compiler="eager")
    with mode():
        out = torch.compile(model, backend=backend)(x)
        assert torch.equal(out, model(x))
    assert not backend.graphs  # no joint graph, nothing sampled


def test_changing_batch_sizes_recompile_once_per_mode():
    model = mlp(64, 128, 128, 8)
    counted, compiled_graphs = counting(ubcompile.backend(p=0.25, seed=0, compiler="eager"))
    compiled = torch.compile(model, backend=counted)
    for n in (64, 80, 96, 72):  # static, then one dynamic graph for every later size
        x = torch.randn(n, 64)
        assert not equal(grads(compiled, model, x), grads(model, model, x))
    assert len(compiled_graphs) == 2
    model.eval()
    for n in (88, 56, 100):  # the batch is already dynamic: one graph for eval
        x = torch.randn(n, 64)
        assert equal(grads(compiled, model, x), grads(model, model, x))
    assert len(compiled_graphs) == 3


DRAWS = 32
SAMPLED = ("0.weight", "2.weight", "4.weight")  # mlp(64, 128, 128, 8): every weight gradient, by its 64 rows


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)],
                         ids=["bf16", "fp16", "autocast-bf16"])
def test_low_precision_training_is_sampled_and_unbiased(dtype, autocast):
    model, x = mlp(64, 128, 128, 8).to(dtype), torch.randn(64, 64, dtype=dtype)
    compiled = torch.compile(model, backend=ubcompile.backend(p=0.25, seed=0, compiler="eager"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        exact = dict(zip(dict(model.named_parameters()), grads(model, model, x)))
        draws = [dict(zip(exact, grads(compiled, model, x))) for _ in range(DRAWS)]
    for name, param in model.named_parameters():
        samples = torch.stack([d[name] for d in draws])
        assert samples.dtype == param.dtype and samples.isfinite().all(), name
        if name in SAMPLED:
            assert not torch.equal(samples[0], exact[name])
            result = z_scores(samples.float(), exact[name].float())
            assert result.passed, f"{name}: {result}"
        else:  # exact, up to the rounding of a differently ordered low-precision sum
            torch.testing.assert_close(samples[0], exact[name], rtol=2e-2, atol=2e-2 * float(exact[name].abs().max()))
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_of(compiled(x)).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(p.isfinite().all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
