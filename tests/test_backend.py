"""End-to-end behaviour of the compiled model: forward, exactness, randomness, modes."""

import pytest
import torch

import ubcompile

from conftest import loss_of, make


def grads(model, x, backend, steps=1):
    """Parameter gradients after ``steps`` backward passes of a freshly compiled ``model`` (list per step)."""
    compiled = torch.compile(model, backend=backend)
    params = [p for p in model.parameters() if p.requires_grad]
    return [torch.autograd.grad(loss_of(compiled(x)), params) for _ in range(steps)]


def close(a, b, tol=1e-5):
    return all(torch.allclose(u, v, rtol=tol, atol=tol) for u, v in zip(a, b))


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
def test_forward_unchanged(grad):
    model, x = make("mlp_3d")
    expected = torch.compile(model, backend="inductor")(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend=ubcompile.backend(grad=grad))(x)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
def test_p_one_is_exact(grad):
    model, x = make("mlp")
    (exact,) = grads(model, x, "inductor")
    torch._dynamo.reset()
    (sampled,) = grads(model, x, ubcompile.backend(p=1.0, grad=grad))
    assert close(sampled, exact)


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
def test_sampled_gradients_differ_from_exact_and_between_steps(grad):
    model, x = make("mlp")
    (exact,) = grads(model, x, "inductor")
    torch._dynamo.reset()
    first, second = grads(model, x, ubcompile.backend(grad=grad, seed=0), steps=2)
    assert not close(first, exact) and not close(first, second)


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
def test_same_seed_same_gradients(grad):
    model, x = make("mlp")
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        runs.append(grads(model, x, ubcompile.backend(grad=grad, seed=123), steps=2))
    assert all(close(a, b, tol=0) for a, b in zip(*runs))


def test_manual_seed_reproduces_without_a_seed():
    model, x = make("mlp")
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(7)
        runs.append(grads(model, x, ubcompile.backend(), steps=2))
    assert all(close(a, b, tol=0) for a, b in zip(*runs))


def test_draws_do_not_shift_torch_global_random_stream():
    model, x = make("mlp")
    after = {}
    for name, backend in [("exact", "inductor"), ("sampled", ubcompile.backend(grad="both"))]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        grads(model, x, backend, steps=3)
        after[name] = torch.rand(8)
    assert torch.equal(after["exact"], after["sampled"])


def test_string_backend_uses_default_settings():
    model, x = make("mlp")
    (exact,) = grads(model, x, "inductor")
    torch._dynamo.reset()
    (sampled,) = grads(model, x, "ubcompile")
    assert not close(sampled, exact)
    # Default grad="weight": every weight gradient is sampled (the head's by its 64 rows), every bias exact.
    assert not any(close([s], [e]) for s, e in zip(sampled[0::2], exact[0::2])) and close(sampled[1::2], exact[1::2])


def test_no_grad_compiles_untouched_inference_graph():
    model, x = make("mlp")
    backend = ubcompile.backend(grad="both")
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-5)
    assert not backend.report().entries  # the joint pass never ran


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
def test_eager_and_inductor_compile_the_same_estimator(grad):
    """The same seed draws the same indices, so ``aot_eager``-style and Inductor graphs agree."""
    model, x = make("mlp_3d")
    results = []
    for compiler in ubcompile.COMPILERS:
        torch._dynamo.reset()
        results.append(grads(model, x, ubcompile.backend(grad=grad, seed=5, compiler=compiler), steps=2))
    assert all(close(a, b, tol=1e-4) for a, b in zip(*results))


def test_report_keeps_every_graph_and_prints_a_table():
    model, x = make("mlp")
    backend = ubcompile.backend(grad="both", sketch="uniform")
    grads(model, x, backend)
    report = backend.report()
    assert len(report.graphs) == 1 and report.graphs[0].joint_code and "sampled_gemm" in report.backward_code
    table = str(report)
    assert "grad_weight" in table and "32/128 features" in table and "of exact" in table


@pytest.mark.parametrize("grad", ubcompile.GRAD_MODES)
def test_dynamic_batch_stays_sampled_with_one_recompile(grad):
    model, _ = make("mlp")
    backend = ubcompile.backend(grad=grad, seed=0)
    compiled = torch.compile(model, backend=backend)
    params = list(model.parameters())
    for n in (64, 80, 96, 72):
        x = torch.randn(n, 96)
        sampled = torch.autograd.grad(loss_of(compiled(x)), params)
        exact = torch.autograd.grad(loss_of(model(x)), params)
        assert not close(sampled, exact)
    report = backend.report()
    assert len(report.graphs) == 2  # static, then one dynamic graph for every later size
    dynamic = report.graphs[1]
    assert [e.sampled for e in dynamic.entries] == [e.sampled for e in report.graphs[0].entries]
    assert "Sym(" in dynamic.backward_code and "sampled_gemm" in dynamic.backward_code
