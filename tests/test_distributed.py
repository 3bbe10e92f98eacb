"""Data parallelism: DDP over gloo, two CPU processes, each rank drawing its own indices."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ubcompile
from ubcompile import sampler as sampler_module

from conftest import loss_of
from ranks import run_ranks

WORLD = 2
LOCAL_STEPS = 4  # no_sync steps: each rank's own gradient, before any all-reduce
SAMPLED = ("layers.0.weight", "layers.2.weight", "layers.4.weight")  # every weight, by its 64 rows; biases stay exact


class MLP(nn.Module):
    """A user-defined module: Dynamo compiles its ``forward`` frame inside DDP's (skipped) forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _named_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _train(rank: int, world: int) -> dict:
    """One rank's run: identical weights and inputs on every rank, ``LOCAL_STEPS`` unsynchronised
    backward passes, then two synchronised SGD steps."""
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(64, 64)
    ddp = nn.parallel.DistributedDataParallel(model)
    backend = ubcompile.backend(p=0.25, seed=0, compiler="eager", min_speedup=0)
    compiled = torch.compile(ddp, backend=backend)
    loss_of(model(x)).backward()
    result: dict = {"exact": _named_grads(model), "local": []}
    for _ in range(LOCAL_STEPS):
        model.zero_grad(set_to_none=True)
        with ddp.no_sync():
            loss_of(compiled(x)).backward()
        result["local"].append(_named_grads(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss_of(compiled(x)).backward()
        result["synced"] = _named_grads(model)
        optimizer.step()
    result["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    result["sampled"] = len(backend.report().sampled)
    result["state_rank"] = backend.state_dict()["rank"]
    return result


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """The results of both ranks of one DDP run (started once for the module's tests)."""
    return run_ranks(_train, WORLD, __name__)


def test_ddp_trains_and_ranks_end_with_identical_parameters(ranks):
    assert all(r["sampled"] for r in ranks)  # the backend rewrote the compiled graph on every rank
    first, second = ranks
    for name in first["params"]:
        torch.testing.assert_close(first["synced"][name], second["synced"][name], rtol=0, atol=0)
        torch.testing.assert_close(first["params"][name], second["params"][name], rtol=0, atol=0)


def test_ranks_draw_different_indices(ranks):
    first, second = ranks
    assert [r["state_rank"] for r in ranks] == [0, 1]
    for step in range(LOCAL_STEPS):
        for name in first["exact"]:
            same = torch.equal(first["local"][step][name], second["local"][step][name])
            assert same == (name not in SAMPLED), (step, name)  # identical inputs: only the draws differ


def test_averaging_the_ranks_halves_the_sampling_error(ranks):
    """Independent draws: the error of the two ranks' mean has half the squared size of one rank's
    (identical draws would give the same size)."""
    for name in SAMPLED:
        exact = ranks[0]["exact"][name]
        local = [[r["local"][step][name] for r in ranks] for step in range(LOCAL_STEPS)]
        single = sum((g - exact).square().sum() for draws in local for g in draws) / (WORLD * LOCAL_STEPS)
        mean = sum((sum(draws) / WORLD - exact).square().sum() for draws in local) / LOCAL_STEPS
        assert mean < 0.75 * single, (name, float(mean / single))


def test_a_checkpoint_loaded_on_another_rank_draws_apart(monkeypatch):
    """A checkpoint saved by rank 0 and loaded by every rank must not make the ranks draw alike."""
    cpu = torch.device("cpu")
    original = ubcompile.backend(seed=0, min_speedup=0)
    original.sampler.generator(cpu)
    saved = original.state_dict()
    draws: dict[int, list[torch.Tensor]] = {}
    for rank in (0, 0, 1):
        monkeypatch.setattr(sampler_module, "_rank", lambda: rank)
        resumed = ubcompile.backend(seed=0, min_speedup=0)
        resumed.load_state_dict(saved)
        draws.setdefault(rank, []).append(torch.rand(8, generator=resumed.sampler.generator(cpu)))
    assert torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0][0], draws[1][0])
