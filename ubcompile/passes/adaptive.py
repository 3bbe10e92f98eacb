"""The ``p="auto"`` family: backward GEMMs handed to the run-time controller.

A weight gradient ``G^T A`` of a linear layer contracts the cotangent's batch/token rows: the
controller samples them. Under ``p="auto"`` the pass replaces the product by one call of
``torch.ops.ubcompile.auto_contraction``, whose output has the exact product's shape, so the graph
stays static while the controller (:mod:`ubcompile.auto`) decides at every call. A propagated
gradient ``G W`` stays the graph's own exact ``mm`` (its noise would reach every earlier layer),
counted at its exact FLOPs by the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.fx
from torch import Tensor

from .._torch_private import size_hint
from ..auto import LEVELS
from ..config import SamplingConfig
from .gemm import GemmSite
from .graph import ROWS, Role, module_path, shape_of
from .inline import inline_call
from .rules import Draws, decline

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
             aten.permute.default, aten.transpose.int, aten.clone.default)


@dataclasses.dataclass(frozen=True)
class AdaptiveRewrite:
    """An ``mm`` handed to the controller: a weight gradient whose ``n`` contracted rows it samples
    (the rows of ``samples`` samples: a node whose dim 0 is the batch of a flattened
    ``(batch, tokens, ..., features)`` activation, or ``None`` for one row per sample)."""

    site: GemmSite
    n: int
    samples: Optional[torch.fx.Node] = None

    def insert(self, graph: torch.fx.Graph, draws: Draws) -> None:
        """Replace the product by the controlled op, which finds its site in the controller of the
        stream ``draws.handle`` names when it runs (by module and ordinal among the graph's
        products of that module: nothing process-local enters the graph) and draws from ``draws.seed``.
        The number of samples is read at run time, so a dynamic sequence length groups each call's
        rows by its own length."""
        node = self.site.node
        module = module_path(node)
        ordinal, index = draws.controlled.count(module), len(draws.controlled)
        draws.controlled.append(module)

        def controlled(x: Tensor, y: Tensor, seed: Tensor, handle: Tensor, *samples: Tensor) -> Tensor:
            count = samples[0].shape[0] if samples else y.shape[0]
            return torch.ops.ubcompile.auto_contraction(x, y, seed, handle, module, ordinal, index, count)

        operands = [*node.args, draws.seed, draws.handle, *([self.samples] if self.samples else [])]
        with graph.inserting_before(node):
            call = inline_call(graph, controlled, operands, meta_from=node)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


def sample_batch(operand: torch.fx.Node, n: int) -> Optional[torch.fx.Node]:
    """The node whose dim 0 counts the samples of the product's ``n`` rows, if the activation
    operand is a flattened ``(batch, tokens, ..., features)`` tensor (``None``: a row per sample)."""
    node = operand
    while isinstance(node, torch.fx.Node):
        shape = shape_of(node)
        if shape is not None and len(shape) >= 3 and math.prod(size_hint(d) for d in shape[:-1]) == n:
            return node if size_hint(shape[0]) < n else None
        if node.op != "call_function" or node.target not in _RESHAPES:
            break
        node = node.args[0]
    return None


def plan_adaptive(site: GemmSite, config: SamplingConfig) -> Union[AdaptiveRewrite, str]:
    """The controlled rewrite of ``site`` under ``p="auto"``, or the reason it stays exact."""
    if site.role is Role.GRAD_INPUT:
        return "p='auto' keeps propagated gradients exact: their noise would reach every earlier layer"
    n = size_hint(site.cotangent.meta["val"].shape[-2])
    reason = decline(config, site.role, module_path(site.node), n, product=site.product(ROWS))
    if reason is not None:
        return reason
    if site.node.target is not aten.mm.default or site.contracted != ROWS:
        return "p='auto' controls 2-D weight-gradient products over batch/token rows only"
    if n < 1 / LEVELS[-1]:
        return f"{n} rows are too few to sample"
    activation = site.node.args[1 - site.cotangent_arg]
    return AdaptiveRewrite(site, n, sample_batch(activation, n))
