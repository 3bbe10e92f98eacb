"""A training step makes no host sync and few ATen ops (issue 19): on a GPU every sync is a stall
and every op a launch. Counted with ``torch.profiler`` over one warm forward and backward of a
compiled MLP: syncs as the ATen ops a host read of a tensor becomes (``.item()``, ``.tolist()``,
``float(t)``, ``nonzero``), ops as every ATen event (nested ones included)."""

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ubcompile

from conftest import loss_of, mlp

pytestmark = pytest.mark.compiled_kernels

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero")


def ops_per_step(backend) -> list[str]:
    model = mlp(96, 128, 128, 128, 10)
    torch.manual_seed(1)
    x = torch.randn(64, 96)
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # compile, warm up
        loss_of(compiled(x)).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_of(compiled(x)).backward()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def syncs_per_step(backend) -> list[str]:
    return [name for name in ops_per_step(backend) if name in SYNC_OPS]


@pytest.mark.parametrize("options", [{}, {"grad": "both"}, {"grad": "both", "sketch": "uniform"},
                                     {"sketch": "activation"}, {"grad": "both", "sketch": "lowrank", "p": 0.1},
                                     {"grad": "both", "axis": "rows"}])
def test_a_sampled_training_step_makes_no_host_sync(options):
    backend = ubcompile.backend(min_dim=16, seed=0, **options)
    assert syncs_per_step(backend) == []
    assert backend.report().sampled


def test_auto_makes_no_host_sync():
    assert syncs_per_step(ubcompile.backend(p="auto", min_dim=16, seed=0)) == []


def syncs_after_warmup(model: torch.nn.Module, x: torch.Tensor, backend) -> list[str]:
    """The syncs of ten steps after six that compile every body the controller will call (Dynamo
    reads 0-d tensors as it traces them: a one-off sync per body)."""
    compiled = torch.compile(model, backend=backend)
    for _ in range(6):
        loss_of(compiled(x)).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            loss_of(compiled(x)).backward()
    return [e.name for e in prof.events() if e.name in SYNC_OPS]


def test_auto_on_convolutions_makes_no_host_sync():
    """After six steps (calls 0-5, measurements 0 and 5), the next ten, sampled, measurement 15
    included, make no sync."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(32 * 144, 10))
    x = torch.randn(32, 3, 16, 16)
    backend = ubcompile.backend(p="auto", min_dim=16, seed=0, min_speedup=0, budget=4.0)
    assert syncs_after_warmup(model, x, backend) == []
    backend.sampler.auto.collect(wait=True)
    conv = [s for s in backend.sampler.auto.sites if s.family == "conv"]
    assert len(conv) == 2 and all([m.call for m in s.measurements] == [0, 5, 15] and s.uses[0] == 1 for s in conv)


OPS_PER_SAMPLED_GEMM = 25
"""What a sampled GEMM may add to a step's ATen ops: about 15 for its one compiled op (the draw's
ATen fallbacks on the CPU: a top-k, a sort, two scans and a search, with their buffers), fewer for
one that reuses a layer's draw; its product replaces the exact GEMM. With the importances and the
product as ops of their own it was 29; run eagerly, the op bodies dispatched about 200."""


@pytest.mark.parametrize("options", [{}, {"sketch": "activation"}, {"grad": "both", "sketch": "uniform"}])
def test_the_ops_a_sampled_gemm_adds_to_a_step_are_the_compiled_draws(options):
    exact = len(ops_per_step("inductor"))
    torch._dynamo.reset()
    backend = ubcompile.backend(min_dim=16, seed=0, **options)
    added = len(ops_per_step(backend)) - exact
    assert added <= OPS_PER_SAMPLED_GEMM * len(backend.report().sampled), (added, len(backend.report().sampled))


OPS_PER_RESIDUAL_CALL = 40
"""What one ``p="auto"`` call on the residual sketch may dispatch, bases neither made nor tracked:
the draw's 15 (as above), its product's five GEMMs with their ``resolve_conj`` (17), the
spike guard's read-back copy; its coordinates and the product's rank-``r`` parts are fused
loops (37 in all, 2026-12-04). Written with a GEMM for each of its nine products it took 51."""

OPS_PER_NORM_CALL = 26
"""What one ``p="auto"`` call on the norm sketch may dispatch when it does not measure: one compiled
body (the terms' norms, the draw, the gathers and the GEMM) and the spike guard's read-back copy:
24 ATen ops in all on 2026-12-07. Run as the norms' body, the draw's body and an eager product, it
dispatched 34."""


@pytest.mark.parametrize("sketch, shape, bound", [("residual", (256, 128, 256), OPS_PER_RESIDUAL_CALL),
                                                  ("norm", (64, 512, 64), OPS_PER_NORM_CALL)])
def test_a_controlled_call_dispatches_few_ops(sketch, shape, bound):
    """A site set to ``sketch`` at level 3, measuring no more: the ATen ops of one warm call."""
    from ubcompile.auto import AutoController

    gen = torch.Generator().manual_seed(0)
    (m, n, big_n) = shape
    x, y = torch.randn(m, n, generator=gen), torch.randn(n, big_n, generator=gen)
    c = AutoController(budget=4.0, measure_every=50)
    c.register("layer", shape)
    site = c.sites[0]

    def call():
        return c.contraction(x, y, 0, torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, generator=gen), 0)

    call()
    c.collect(wait=True)
    site.set_option(next(i for i, o in enumerate(site.options) if o.sketch == sketch and o.level == 3))
    site.next_measure = 10**6
    call()  # its first call on this option: the bodies compile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    ops = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert len(ops) <= bound, collections.Counter(ops).most_common()
    assert not [name for name in ops if name in SYNC_OPS]
