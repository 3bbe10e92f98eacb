"""Where the draws come from: independent across graphs and backends, reproducible from a seed
(issue 18, items 5 and 6), and no backend kept alive by the process."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn

import ubcompile
from ubcompile.testing import assert_unbiased

WIDTH = 128


class TwoGraphs(nn.Module):
    """Two identical layers on the same input, split into two graphs by a graph break: with the
    same draws their sampled weight gradients would be equal."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)
        self.second.load_state_dict(self.first.state_dict())

    def forward(self, x):
        a = self.first(x)
        torch._dynamo.graph_break()
        return a + self.second(x)


def batch():
    torch.manual_seed(1)
    return torch.randn(WIDTH, WIDTH), torch.randn(WIDTH, WIDTH)


def step(compiled, model, x, target):
    """The two layers' weight gradients after one backward of the compiled model."""
    loss = (compiled(x) - target).square().sum()
    return torch.autograd.grad(loss, [model.first.weight, model.second.weight])


@pytest.mark.parametrize("backend", ["ubcompile", "object"])
def test_the_graphs_of_a_split_model_draw_independently(backend):
    torch.manual_seed(0)
    model = TwoGraphs()
    x, target = batch()
    compiled = torch.compile(model, backend=ubcompile.backend() if backend == "object" else backend)
    exact = torch.autograd.grad((model(x) - target).square().sum(), [model.first.weight])[0]
    for _ in range(3):
        first, second = step(compiled, model, x, target)
        assert not torch.allclose(first, exact, rtol=1e-4, atol=1e-4)  # sampled
        assert not torch.allclose(first, second, rtol=1e-4, atol=1e-4)  # by different draws


def test_two_backends_without_a_seed_draw_independently():
    torch.manual_seed(0)
    model = TwoGraphs()
    x, target = batch()
    one, two = (torch.compile(model, backend=ubcompile.backend()) for _ in range(2))
    assert not torch.allclose(step(one, model, x, target)[0], step(two, model, x, target)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [None, 5])
def test_reseeding_torch_reproduces_the_draws_in_process(seed):
    """``torch.manual_seed(s)`` restarts a ``seed=None`` backend's streams; a backend with its own
    seed ignores torch's. Consecutive steps always draw afresh."""
    torch.manual_seed(0)
    model = TwoGraphs()
    x, target = batch()
    compiled = torch.compile(model, backend=ubcompile.backend(seed=seed))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append([step(compiled, model, x, target) for _ in range(2)])
    (a1, a2), (b1, b2) = runs
    assert not torch.equal(a1[0], a2[0])
    if seed is None:
        assert all(torch.equal(u, v) for u, v in zip(a1 + a2, b1 + b2))
    else:
        assert not torch.equal(a1[0], b1[0])  # its stream went on


def test_a_fresh_compile_after_the_same_seed_draws_the_same():
    grads = []
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TwoGraphs()
        x, target = batch()
        grads.append(step(torch.compile(model, backend="ubcompile"), model, x, target))
    assert all(torch.equal(u, v) for u, v in zip(*grads))


def test_no_backend_outlives_its_compiled_graphs():
    backend = ubcompile.backend()
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    torch.compile(model, backend=backend)(torch.randn(WIDTH, WIDTH)).sum().backward()
    alive = [weakref.ref(backend), weakref.ref(backend.sampler)]
    del backend, model
    torch._dynamo.reset()
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("grad", ["weight", "both"])
def test_a_model_split_by_a_graph_break_is_unbiased(compiler, grad):
    """Each graph of the split model draws from its own stream; every gradient stays unbiased."""
    torch.manual_seed(0)
    model = TwoGraphs()
    x, target = batch()
    backend = ubcompile.backend(grad=grad, compiler=compiler)
    assert_unbiased(model, lambda out: (out - target).square().sum(), x, draws=100, backend=backend)
    assert len(backend.report().graphs) == 2 and all(g.entries for g in backend.report().graphs)
