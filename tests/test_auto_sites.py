"""``p="auto"`` state lives as long as its layers do (issue 18, item 4): sites keyed by module,
role and ordinal are rebound by a recompile, one budget per compiled model, the per-sample
grouping read at run time."""

import torch
import torch.nn as nn

import ubcompile

from conftest import mlp


def train(compiled, batches):
    for x in batches:
        compiled(x).square().mean().backward()


def sample_sites(backend):
    return backend.sampler.auto.sites


def test_a_recompile_for_a_smaller_last_batch_rebinds_the_sites():
    """A smaller batch recompiles the graph (automatic dynamic shapes); its products are the same
    layers' and must not leave the first graph's sites behind to take a share of the budget."""
    torch.manual_seed(0)
    model = mlp(32, 128, 128, 4)
    backend = ubcompile.backend(p="auto", min_dim=16, compiler="eager", seed=0)
    compiled = torch.compile(model, backend=backend)
    train(compiled, [torch.randn(96, 32) for _ in range(3)] + [torch.randn(40, 32)] + [torch.randn(96, 32)])
    assert len(backend.report().graphs) == 2  # the recompile happened
    assert sorted(s.module for s in sample_sites(backend)) == ["0", "2", "4"]
    assert all(s.calls == 5 for s in sample_sites(backend))


def test_two_models_on_one_backend_have_a_budget_each():
    """A model's gradients do not depend on whether another model shares its backend."""
    def run(with_other):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, other = mlp(32, 128, 128, 4), mlp(32, 256, 4, seed=1)
        backend = ubcompile.backend(p="auto", min_dim=4, compiler="eager", seed=0, measure_every=2)
        compiled = torch.compile(model, backend=backend)
        compiled_other = torch.compile(other, backend=backend)
        grads = []
        for step in range(12):
            x = torch.randn(96, 32, generator=torch.Generator().manual_seed(step))
            model.zero_grad()
            compiled(x).square().mean().backward()
            grads.append(model[0].weight.grad.clone())
            if with_other:
                (100 * compiled_other(x)).square().mean().backward()
        return grads, backend

    alone, _ = run(False)
    shared, backend = run(True)
    assert len({s.domain for s in backend.sampler.auto.sites}) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64))

    def forward(self, x):
        return self.layers(x)


def test_the_tokens_per_sequence_are_read_at_run_time():
    """Under a dynamic sequence length the SGD variance groups each sequence's rows by its
    current length, not the compiled one."""
    torch.manual_seed(0)
    backend = ubcompile.backend(p="auto", min_dim=16, compiler="eager", measure_every=1)
    compiled = torch.compile(Tokens(), backend=backend, dynamic=True)
    for length in (7, 11):
        compiled(torch.randn(8, length, 24)).sum().backward()
        assert [s.group for s in sample_sites(backend)] == [length, length]
