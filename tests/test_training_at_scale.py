"""The large-model recipe (issue 21): the compositions users copy from torchtitan, on gloo CPU ranks.

Three ways of compiling a data-parallel model, each run on 1, 2 and 4 ranks that all see the same
batch (so the reduced exact gradient is the single-process one and only the draws differ):

- ``ddp``: ``torch.compile(DDP(model))``; Dynamo's DDP optimizer splits the model into one graph per
  gradient bucket (``optimize_ddp``, on by default), each with its own stream;
- ``fsdp_root``: ``fully_shard(model)`` on the root, the whole model compiled;
- ``fsdp_blocks``: torchtitan's recipe, each block compiled and ``fully_shard``-ed, then the root;
- ``fsdp_blocks_whole`` (2 ranks): every block sharded, then the whole model compiled.

For each: parameters in sync after AdamW steps, every block's weight gradients sampled, the reduced
gradient unbiased against an exact run of the same sharded model, and its sampling variance falling
as ``1 / world_size`` (independent draws on every rank). The per-block recipe runs again with
``torch.utils.checkpoint`` and a selective-checkpoint policy around each block: one draw per sampled
GEMM per step, unbiased, and the bytes saved for backward those of exact training's.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import ubcompile
from ubcompile import sampler as sampler_module
from ubcompile.testing import critical_z, gradient_accumulators

from conftest import SAVE_PRODUCTS, counting_draws, loss_of
from ranks import run_ranks

try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    fully_shard = DTensor = None

WIDTH, BLOCKS, BATCH = 64, 3, 96
DRAWS = 40
SAMPLED = {f"blocks.{i}.{layer}.weight" for i in range(BLOCKS) for layer in ("up", "down")}  # biases and norms
# stay exact; so does the 8-way head, by ONLY_BLOCKS, in the recipes that compile it
ONLY_BLOCKS = dict(filter=lambda module: "head" not in module)
BUCKET_BYTES = 64 * 1024  # about one block: DDP (and Dynamo's split) make a gradient bucket, a graph, per block
COMPOSITIONS = ("ddp", "fsdp_root", "fsdp_blocks")
CHECKPOINTING = ("fsdp_blocks_checkpoint", "fsdp_blocks_selective")
RUNS = {1: COMPOSITIONS, 2: (*COMPOSITIONS, "fsdp_blocks_whole", *CHECKPOINTING), 4: COMPOSITIONS}  # one launch each


class Block(nn.Module):
    """A pre-norm residual MLP block, the unit that torchtitan compiles, shards and checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Checkpointed(nn.Module):
    """``block`` under non-reentrant ``torch.utils.checkpoint``, optionally with a selective policy.
    Its state-dict keys are the block's (``blocks.0.up.weight``), as with torchtitan's wrapper."""

    def __init__(self, block: nn.Module, selective: bool) -> None:
        super().__init__()
        self.block = block
        self.options = {"context_fn": SAVE_PRODUCTS} if selective else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False, **self.options)


def _build(recipe: str, model: Model, backend: ubcompile.Backend) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` made data-parallel and compiled as ``recipe`` says; the callable that runs it."""
    if recipe == "ddp":
        return torch.compile(nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_BYTES / 2**20),
                             backend=backend)
    if recipe == "fsdp_root":
        fully_shard(model)
        return torch.compile(model, backend=backend)
    if recipe == "fsdp_blocks_whole":  # every block sharded, the whole model compiled: Dynamo breaks the
        for block in model.blocks:     # graph at FSDP's hooks and compiles each block's forward
            fully_shard(block)
        fully_shard(model)
        return torch.compile(model, backend=backend)
    for i, block in enumerate(model.blocks):
        if recipe != "fsdp_blocks":
            block = Checkpointed(block, selective=recipe == "fsdp_blocks_selective")
        model.blocks[i] = torch.compile(block, backend=backend)
        fully_shard(model.blocks[i])
    fully_shard(model)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's reduced gradient, whole, by its name in the unwrapped model."""
    return {_plain(name): _full(p.grad).detach().clone() for name, p in model.named_parameters()}


def _plain(name: str) -> str:
    """``blocks.0._orig_mod.block.up.weight`` (compiled, checkpointed) as ``blocks.0.up.weight``."""
    return name.replace("_orig_mod.", "").replace(".block.", ".")


def _saved_bytes(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the activations (tensors led by the batch dimension) that one forward saves for its
    backward, each storage once; parameters, which FSDP gathers again for the backward, are left out."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[0] == BATCH:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(step(x))
    loss.backward()
    return sum(storages.values())


def _in_sync(model: nn.Module) -> bool:
    """Whether every rank holds the same parameters."""
    flat = torch.cat([_full(p).detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _run(recipe: str, x: torch.Tensor, draws: int) -> dict:
    """Exact and sampled runs of ``recipe``: the statistics rank 0 reports."""
    torch.manual_seed(0)
    exact_model = Model()
    exact_step = _build(recipe, exact_model, ubcompile.backend(p=1.0, compiler="eager"))
    exact_bytes = _saved_bytes(exact_step, x)
    exact = _gradients(exact_model)

    torch.manual_seed(0)
    model = Model()
    backend = ubcompile.backend(p=0.25, seed=0, compiler="eager", min_speedup=0, **ONLY_BLOCKS)
    step = _build(recipe, model, backend)
    names = list(exact)
    accumulators = dict(zip(names, gradient_accumulators([exact[n] for n in names])))
    squared_errors, first = [], None
    with counting_draws() as count:
        for _ in range(draws):
            model.zero_grad(set_to_none=True)
            loss_of(step(x)).backward()
            grads = _gradients(model)
            first = first or grads
            for name, accumulator in accumulators.items():
                accumulator.add(grads[name])
            squared_errors.append(sum(float((grads[n] - exact[n]).double().square().sum()) for n in SAMPLED))
    sampled = {n for n in names if not torch.equal(grads[n], first[n])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(step(x))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"sampled": sampled, "squared_errors": torch.tensor(squared_errors, dtype=torch.float64),
            "z": {name: a.result() for name, a in accumulators.items()}, "draws_per_step": count[0] / draws,
            "graphs": len(backend.graphs), "report": len(backend.report().sampled),
            "streams": len(backend.state_dict()["generators"]), "in_sync": _in_sync(model),
            "finite": all(math.isfinite(v) for v in losses),
            "saved_bytes": (exact_bytes, _saved_bytes(step, x))}


def _recipes(rank: int, world: int, recipes: tuple[str, ...], draws: int, correlated: bool = False) -> Optional[dict]:
    """One rank's runs of ``recipes``; ``correlated`` (the control) makes every rank draw as rank 0."""
    if correlated:
        sampler_module._rank = lambda: 0
    dist._DEFAULT_FIRST_BUCKET_BYTES = BUCKET_BYTES  # DDP and Dynamo's split: a first bucket no larger
    torch.manual_seed(1)
    x = torch.randn(BATCH, WIDTH)  # the same batch on every rank
    results = {recipe: _run(recipe, x, draws) for recipe in recipes}
    return results if rank == 0 else None


pytestmark = pytest.mark.skipif(fully_shard is None, reason="torch.distributed with FSDP2 is not available")


@functools.cache
def _results(world: int, correlated: bool = False) -> dict:
    """Rank 0's results of the runs on ``world`` ranks (of ``ddp`` alone for the ``correlated`` control)."""
    recipes = ("ddp",) if correlated else RUNS[world]
    return run_ranks(_recipes, world, __name__, recipes=recipes, draws=DRAWS, correlated=correlated)[0]


def _variance(result: dict) -> tuple[float, float]:
    """The mean squared sampling error of the reduced gradient and its standard error."""
    errors = result["squared_errors"]
    return float(errors.mean()), float(errors.std() / len(errors) ** 0.5)


def _variance_ratio_agrees(single: dict, reduced: dict, world: int, num_tests: int) -> tuple[bool, str]:
    """Whether ``V_1 / V_world`` is consistent with ``world`` (independent ranks) within
    ``critical_z`` standard errors of the ratio (delta method from the two measured standard
    errors)."""
    (v1, s1), (vw, sw) = _variance(single), _variance(reduced)
    ratio = v1 / vw
    se = ratio * math.hypot(s1 / v1, sw / vw)
    z = (ratio - world) / se
    return abs(z) <= critical_z(num_tests), f"V_1 / V_{world} = {ratio:.2f} ± {se:.2f} (z = {z:.1f})"


@pytest.mark.parametrize(("recipe", "world"), [(recipe, world) for world, recipes in RUNS.items()
                                               for recipe in recipes if recipe not in CHECKPOINTING])
def test_recipe_trains_in_sync_samples_every_block_and_is_unbiased(recipe, world):
    result = _results(world)[recipe]
    assert result["in_sync"] and result["finite"]
    assert result["sampled"] == SAMPLED and result["report"] > 0
    assert result["draws_per_step"] == len(SAMPLED)
    biased = {name: str(z) for name, z in result["z"].items() if not z.passed}
    assert not biased, biased


def test_every_split_graph_draws_from_a_stream_of_its_own():
    """DDP's graph splitting: one compiled graph per bucket (plus the head's), each its own stream."""
    result = _results(2)["ddp"]
    assert result["graphs"] >= BLOCKS and result["streams"] == result["graphs"]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("recipe", COMPOSITIONS)
def test_sampling_variance_of_the_reduced_gradient_falls_as_one_over_world_size(recipe, world):
    agrees, message = _variance_ratio_agrees(_results(1)[recipe], _results(world)[recipe], world, 2 * len(COMPOSITIONS))
    assert agrees, message


def test_the_variance_check_rejects_ranks_that_draw_alike():
    """The control: every rank seeded as rank 0 draws the same rows, so averaging two ranks leaves
    the variance as it was, and the check must say so."""
    correlated = _results(2, correlated=True)["ddp"]
    agrees, message = _variance_ratio_agrees(_results(1)["ddp"], correlated, 2, 2 * len(COMPOSITIONS))
    assert not agrees, message


@pytest.mark.parametrize("recipe", CHECKPOINTING)
def test_checkpointed_blocks_draw_once_per_step_unbiased_and_save_what_exact_saves(recipe):
    result = _results(2)[recipe]
    plain = _results(2)["fsdp_blocks"]
    assert result["in_sync"] and result["finite"] and result["sampled"] == SAMPLED
    assert result["draws_per_step"] == len(SAMPLED)  # the recomputed forward does not draw again
    biased = {name: str(z) for name, z in result["z"].items() if not z.passed}
    assert not biased, biased
    exact_bytes, sampled_bytes = result["saved_bytes"]
    assert sampled_bytes <= exact_bytes < plain["saved_bytes"][0], (result["saved_bytes"], plain["saved_bytes"])


def _draw(backend: ubcompile.Backend) -> torch.Tensor:
    return torch.rand(8, generator=backend.sampler.generator(torch.device("cpu")))


def test_sampler_states_restore_on_the_same_or_another_number_of_ranks(monkeypatch):
    """Each of N ranks saves its own ``backend.state_dict()``. Restored on N ranks, each continues its
    stream exactly; on M ranks, rank ``r`` loads what rank ``r % N`` saved: the ranks that saved
    continue, the others are re-seeded with their own rank at their first draw, so no two draw alike."""
    saved, continued = {}, {}
    for rank in range(2):
        monkeypatch.setattr(sampler_module, "_rank", lambda rank=rank: rank)
        backend = ubcompile.backend(seed=0, min_speedup=0)
        _draw(backend)
        saved[rank] = backend.state_dict()
        continued[rank] = _draw(backend)
    for world in (1, 2, 4):
        draws = []
        for rank in range(world):
            monkeypatch.setattr(sampler_module, "_rank", lambda rank=rank: rank)
            resumed = ubcompile.backend(seed=0, min_speedup=0)
            resumed.load_state_dict(saved[rank % len(saved)])
            draws.append(_draw(resumed))
            if rank in continued:
                assert torch.equal(draws[-1], continued[rank]), (world, rank)
        assert len({tuple(d.tolist()) for d in draws}) == world, world


def test_streams_of_every_device_rank_and_graph_are_seeded_apart():
    """A process with two GPUs (and the CPU) seeds a generator per device: no two alike."""
    devices = [torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1), torch.device("mps", 0)]
    seeds = {sampler_module._mix(0, rank, graph, device) for rank in range(4) for graph in range(4) for device in devices}
    assert len(seeds) == 4 * 4 * len(devices)
    assert sampler_module._mix(0, 0, 0, torch.device("cuda")) == sampler_module._mix(0, 0, 0, torch.device("cuda", 0))


def main() -> None:
    """Print the measurements that README's "Training at scale" quotes."""
    for world in (2, 4):
        for recipe in COMPOSITIONS:
            print(recipe, world, _variance_ratio_agrees(_results(1)[recipe], _results(world)[recipe], world, 1)[1])
    print("control (ranks draw alike)", _variance_ratio_agrees(_results(1)["ddp"], _results(2, True)["ddp"], 2, 1)[1])
    for recipe in ("fsdp_blocks", *CHECKPOINTING):
        result = _results(2)[recipe]
        print(recipe, "graphs", result["graphs"], "saved activation bytes (exact, sampled)", result["saved_bytes"],
              "draws per step", result["draws_per_step"])


if __name__ == "__main__":
    main()
