"""The activation sketch: a weight gradient's rows drawn in the forward pass, so only they are saved.

A linear layer ``y = A W^T`` has the weight gradient ``G^T A``, a sum over the ``n`` batch/token
rows ``j`` of ``G_j^T A_j``. The activation sketch keeps row ``j`` with probability
``pi_j = min(1, c ||A_j||)`` (sum ``k``, :func:`~ubcompile.sketches.norm.pps_sample`) and weights it
``1 / pi_j``: unbiased, with variance ``sum_j (1 / pi_j - 1) ||G_j||^2 ||A_j||^2`` (at least the
norm sketch's, whose probabilities also see ``||G_j||``). Because ``pi`` needs only ``A``, the
rows are drawn in the forward: the pass inserts ``torch.ops.ubcompile.gemm_drawing_rows(A)`` next
to the layer's forward ``mm``/``addmm`` (left as it is), which returns the kept rows ``A[idx]``,
``idx`` and the weights, and the weight gradient becomes ``(G[idx] * w)^T A[idx]``. The backward
then needs ``k`` rows of ``A`` instead of ``n``; when nothing else in the backward reads ``A``, the
saved activation shrinks to a fraction ``p``.

One draw per step, also under ``torch.utils.checkpoint``: the draw is its own op, which inherits
the product's metadata, a checkpoint's ``recompute`` tag included. Nothing in the forward needs
it, so a node the checkpoint recomputes is computed in the backward only, once, from the
recomputed (or checkpoint-saved) ``A``: checkpointing saves what it saves without the sketch.
Without a recompute tag the default partitioner (``compiler="eager"``) computes it in the forward
and saves its outputs; the min-cut partitioner (Inductor), for which it is an *unclaimed* node
(reading only forward values, feeding only the backward), puts it on one side with all its
outputs (one op, whose output tuple cannot be saved), in the forward unless ``A`` is saved anyway.
Measured on torch 2.13 (``tests/test_checkpointing.py``): the draw fused with the product, as it
was, was recomputed with it, two draws per step; tagging the draw ``MUST_SAVE`` instead kept one
draw but made a checkpointed ``compiler="eager"`` model save its kept rows as well (1.84x the
bytes checkpointing alone saved on a two-block feed-forward stack).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.fx

from .._torch_private import size_hint
from ..config import SamplingConfig
from ..sketches import keep_count
from ..sketches.matmul import kept_rows_contraction
from .gemm import GemmSite, gemm_dims, gemm_flops
from .graph import ROWS, module_path, shape_of
from .inline import inline_call
from .rules import Draws, decline

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class ForwardRowsRewrite:
    """A weight-gradient ``mm(G^T, A)`` sampled from rows of ``A`` drawn next to the forward GEMM ``host``."""

    site: GemmSite
    host: torch.fx.Node  # the forward mm/addmm whose first operand is A: the draw goes next to it
    p: float
    n: int
    k: int
    sketch = "activation"
    axis = ROWS

    @property
    def activation(self) -> torch.fx.Node:
        return self.site.node.args[1]

    def sampled_flops(self) -> int:
        return gemm_flops(self.site.node) * self.k // self.n

    def insert(self, graph: torch.fx.Graph, draws: Draws) -> None:
        """Draw the rows next to the host (once per activation) and replace the weight gradient by the sampled one."""
        drawn = draws.get(self.activation)
        if drawn is None:
            drawn = draws[self.activation] = self._draw_rows(graph, draws.seed, len(draws))
        node = self.site.node
        with graph.inserting_before(node):
            sampled = inline_call(graph, kept_rows_contraction, [node.args[0], *drawn], meta_from=node)
        node.replace_all_uses_with(sampled)
        graph.erase_node(node)

    def _draw_rows(self, graph: torch.fx.Graph, seed: torch.fx.Node, key: int) -> tuple[torch.fx.Node, ...]:
        """``(A[idx], idx, weights)``, drawn just before the host and with its metadata (which side of
        the partition computes it: see the module docstring)."""
        p = self.p

        def draw(x, seed):
            return torch.ops.ubcompile.gemm_drawing_rows(x, keep_count(x.shape[0], p), seed, key)

        with graph.inserting_before(self.host):
            return tuple(inline_call(graph, draw, [self.activation, seed], meta_from=self.host))


def forward_host(activation: torch.fx.Node, dependent: set[torch.fx.Node]) -> Optional[torch.fx.Node]:
    """The forward ``mm``/``addmm`` (plain, no ``alpha``/``beta``) whose first operand is ``activation``."""
    for user in activation.users:
        if user in dependent or user.kwargs:
            continue
        if (user.target is aten.mm.default and user.args[0] is activation) or (
                user.target is aten.addmm.default and user.args[1] is activation):
            return user
    return None


def plan_forward_rows(site: GemmSite, config: SamplingConfig,
                      dependent: set[torch.fx.Node]) -> Union[ForwardRowsRewrite, str]:
    """The activation-sketch rewrite of ``site``, or the reason it stays exact."""
    n = size_hint(site.cotangent.meta["val"].shape[-2])
    reason = decline(config, site.role, module_path(site.node), n, product=site.product(ROWS))
    if reason is not None:
        return reason
    activation = site.node.args[1]
    if site.node.target is not aten.mm.default or site.contracted != ROWS or site.cotangent_arg != 0 \
            or len(shape_of(activation) or ()) != 2:
        return "the activation sketch samples 2-D weight gradients G^T A over the rows of A only"
    host = forward_host(activation, dependent)
    if host is None:
        return "no forward mm/addmm reads this layer's input, so its rows cannot be drawn in the forward"
    return ForwardRowsRewrite(site, host, config.p, n, keep_count(n, config.p))
