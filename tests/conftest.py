"""Shared models and fixtures. Everything runs on the CPU with fixed seeds."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator
from unittest import mock

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ubcompile import cost_model, draw_kernels, kernels
from ubcompile.estimator_ops import sampled_size, sketched_conv_grads, sketched_product
from ubcompile.sketches.conv import ConvGeometry


# Inductor's graph caches would serve a graph compiled by an earlier test or session, whose report
# holds no GraphModule: the tests inspect graphs compiled here (tests/test_caches.py tests the
# caches in processes of its own). Inductor's kernel cache stays on.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def op_bodies(request, monkeypatch):
    """The op bodies run eagerly except in tests marked ``compiled_kernels``: ``fresh_dynamo``
    drops Inductor's compiled bodies, and bringing them back in every test would cost the suite
    about five minutes. tests/test_kernels.py checks that the two agree; the tests that count ops
    and syncs, and some of the unbiasedness tests, run the compiled ones."""
    monkeypatch.setattr(kernels, "EAGER", request.node.get_closest_marker("compiled_kernels") is None)


@pytest.fixture(autouse=True)
def cost_rule(request, monkeypatch):
    """No cost models, so no cost rule (``min_speedup``), except in tests marked ``cost_rule``
    (tests/test_cost_rule.py). The tests study the estimators on models of width 8-128 and batches
    of 16-256, which the CPU's fitted model would keep exact; a test run in a subprocess of its own
    passes ``min_speedup=0`` instead."""
    if request.node.get_closest_marker("cost_rule") is None:
        monkeypatch.setattr(cost_model, "MODELS", {})


@contextlib.contextmanager
def counting_draws() -> Iterator[list[int]]:
    """Counts, in ``count[0]``, the systematic-PPS draws made under it (``draw_kernels.pps``, which
    the norm and activation sketches' draw ops call)."""
    count, pps = [0], draw_kernels.pps

    def counting(*args, **kwargs):
        count[0] += 1
        return pps(*args, **kwargs)

    with mock.patch.object(draw_kernels, "pps", counting):
        yield count


def _save_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    saved = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


SAVE_PRODUCTS = functools.partial(create_selective_checkpoint_contexts, _save_products)
"""A selective-checkpoint ``context_fn``: keep the GEMMs' outputs, recompute the rest."""


def mlp(*widths: int, bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b, bias=bias))
    return nn.Sequential(*layers)


def frozen_first(model: nn.Sequential) -> nn.Sequential:
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


# name -> (model factory, input shape). The head (last layer) of each has 10 outputs: below min_dim.
MODELS = {
    "mlp": (lambda: mlp(96, 128, 128, 10), (64, 96)),
    "mlp_3d": (lambda: mlp(96, 128, 128, 10), (4, 16, 96)),
    "frozen_first": (lambda: frozen_first(mlp(96, 128, 128, 10)), (64, 96)),
    "no_bias": (lambda: mlp(96, 128, 128, 10, bias=False), (64, 96)),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[name]
    model = factory()
    torch.manual_seed(1)
    return model, torch.randn(*shape)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss whose cotangent is not constant (unlike ``out.sum()``), so sampling has work to do."""
    return (out.float().tanh() * torch.linspace(-1, 1, out.shape[-1])).sum()


class _Record(TorchDispatchMode):
    """Records every call of the ops in ``targets`` dispatched under it, with its arguments."""

    def __init__(self, targets) -> None:
        super().__init__()
        self.targets = targets
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.targets:
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _random_like(node: torch.fx.Node) -> torch.Tensor:
    return torch.randn(node.meta["val"].shape)


def _kept(n: int, k: int) -> torch.Tensor:
    return torch.randperm(n)[:k].sort().values


def _run_sketched_gemm(node: torch.fx.Node) -> None:
    x, y, idx, scale = (_random_like(a) for a in node.args[:4])
    out_dim = node.args[4]
    sketched_product(x, y, _kept(sampled_size(x, y, out_dim), idx.shape[0]), scale, out_dim)


def _run_sketched_conv(node: torch.fx.Node) -> None:
    g, x, w, idx, scale = (_random_like(a) for a in node.args[:5])
    axis, mask = node.args[11:13]
    geometry = ConvGeometry(*(tuple(a) if isinstance(a, (list, tuple)) else a for a in node.args[5:11]))
    sketched_conv_grads(g, x, w, _kept(g.shape[axis], idx.shape[0]), scale, geometry, axis, tuple(mask))


def _run_sampled_conv(node: torch.fx.Node) -> None:
    g, x, w = (_random_like(a) for a in node.args[:3])
    axis, mask, _, k = node.args[9:13]
    geometry = ConvGeometry(*(tuple(a) if isinstance(a, (list, tuple)) else a for a in node.args[3:9]))
    n = g.shape[axis]
    sketched_conv_grads(g, x, w, _kept(n, k), torch.full((k,), n / k), geometry, axis, tuple(mask))


def _run_sampled_gemm(node: torch.fx.Node) -> None:
    x, y = (_random_like(a) for a in node.args[:2])
    out_dim, _, k = node.args[2:5]
    n = sampled_size(x, y, out_dim)
    sketched_product(x, y, _kept(n, k), torch.full((k,), n / k), out_dim)


_ESTIMATOR_OPS = {torch.ops.ubcompile.sketched_gemm.default: _run_sketched_gemm,
                  torch.ops.ubcompile.sampled_gemm.default: _run_sampled_gemm,
                  torch.ops.ubcompile.sketched_conv_backward.default: _run_sketched_conv,
                  torch.ops.ubcompile.sampled_conv_backward.default: _run_sampled_conv}


def inner_calls(graph: torch.fx.GraphModule, targets) -> list[tuple]:
    """``(op, args)`` of every call of an op in ``targets`` the backward ``graph`` makes: its own
    nodes (args as the nodes' example values), and those each ubcompile estimator op makes inside
    (its plain function, run on random operands of the node's shapes)."""
    calls = []
    for node in graph.graph.nodes:
        if node.target in targets:
            calls.append((node.target, torch.fx.map_arg(node.args, lambda a: a.meta["val"])))
        elif node.target in _ESTIMATOR_OPS:
            with _Record(targets) as recorded:
                _ESTIMATOR_OPS[node.target](node)
            calls += recorded.calls
    return calls


def gemm_shapes(graph: torch.fx.GraphModule) -> set[tuple[tuple[int, ...], ...]]:
    """Operand shapes of the ``mm`` and ``bmm`` the backward ``graph`` computes (:func:`inner_calls`)."""
    targets = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    return {tuple(tuple(a.shape) for a in args[:2]) for _, args in inner_calls(graph, targets)}
