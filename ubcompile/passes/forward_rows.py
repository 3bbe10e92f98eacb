"""The activation sketch: a weight gradient's rows drawn in the forward pass, so only they are saved.

A linear layer ``y = A W^T`` has the weight gradient ``G^T A``, a sum over the ``n`` batch/token
rows ``j`` of ``G_j^T A_j``. The activation sketch keeps row ``j`` with probability
``pi_j = min(1, c ||A_j||)`` (sum ``k``, :func:`~ubcompile.sketches.norm.pps_sample`) and weights it
``1 / pi_j``: unbiased, with variance ``sum_j (1 / pi_j - 1) ||G_j||^2 ||A_j||^2`` (at least the
norm sketch's, whose probabilities also see ``||G_j||``). Because ``pi`` needs only ``A``, the
layer's forward GEMM draws the rows: the pass replaces that ``mm``/``addmm`` by
``torch.ops.ubcompile.gemm_drawing_rows``, which returns the same product together with the kept
rows ``A[idx]``, ``idx`` and the weights, and the weight gradient becomes
``(G[idx] * w)^T A[idx]``. The backward then needs ``k`` rows of ``A`` instead of ``n``; when
nothing else in the backward reads ``A``, the saved activation shrinks to a fraction ``p``.

Why one op for the product and the draw: a node that reads only forward values and feeds only the
backward is *unclaimed* by the min-cut partitioner, which may compute it in the forward (to save
its small output) and again in the backward, two different draws for one gradient (measured on
torch 2.13). A node the forward output needs is computed once, in the forward.
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
    """A weight-gradient ``mm(G^T, A)`` sampled from rows of ``A`` drawn by the forward GEMM ``host``."""

    site: GemmSite
    host: torch.fx.Node  # the forward mm/addmm whose first operand is A
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

    def insert(self, graph: torch.fx.Graph, sampler_id: int, draws: Draws) -> None:
        """Make the host draw (once per activation) and replace the weight gradient by the sampled one."""
        drawn = draws.get(self.activation)
        if drawn is None:
            drawn = draws[self.activation] = self._draw_in_host(graph, sampler_id, len(draws))
        node = self.site.node
        with graph.inserting_before(node):
            sampled = inline_call(graph, kept_rows_contraction, [node.args[0], *drawn], meta_from=node)
        node.replace_all_uses_with(sampled)
        graph.erase_node(node)

    def _draw_in_host(self, graph: torch.fx.Graph, sampler_id: int, key: int) -> tuple[torch.fx.Node, ...]:
        host, p = self.host, self.p
        bias = host.args[0] if host.target is aten.addmm.default else None
        operands = [*host.args[-2:], *([bias] if bias is not None else [])]

        def forward(x, y, *bias):
            return torch.ops.ubcompile.gemm_drawing_rows(x, y, *bias or [None], keep_count(x.shape[0], p),
                                                         sampler_id, key)

        with graph.inserting_before(host):
            out, *drawn = inline_call(graph, forward, operands, meta_from=host)
        host.replace_all_uses_with(out)
        graph.erase_node(host)
        return tuple(drawn)


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
    reason = decline(config, site.role, module_path(site.node), gemm_dims(site.node), n)
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
