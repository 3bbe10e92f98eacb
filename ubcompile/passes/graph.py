"""What every rewrite family needs to know about an AOTAutograd joint graph.

* Which nodes are *cotangent-dependent*: they read, directly or not, a ``tangents_*`` input.
* The *role* of a gradient product, found from where its result flows (:class:`GradientFlow`):
  a ``grad_weight`` result only accumulates into parameter gradients (views, transposes, sums and
  adds on the way to the graph's outputs), so its noise stops there; a ``grad_input`` result is
  propagated: it feeds the backward of earlier layers, or leaves the graph as the gradient of an
  input (the previous graph of a split model continues from it).
* The forward module a backward node belongs to (:func:`module_path`).
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import re
from typing import Optional, Sequence

import torch
import torch.fx

aten = torch.ops.aten

ROWS, FEATURES = 0, 1
"""The axes of a cotangent ``G``: ``(rows, features)`` of a GEMM; ``(batch, channels, ...)`` of a
convolution."""


class Role(str, enum.Enum):
    GRAD_INPUT = "grad_input"
    GRAD_WEIGHT = "grad_weight"


@dataclasses.dataclass(frozen=True)
class Unmatched:
    """A backward node the pass does not sample, kept exact, and why."""

    node: torch.fx.Node
    reason: str


# Ops through which a gradient only moves or accumulates: a result that reaches the outputs
# through these alone is a parameter's gradient, not an input to further backward computation.
_ACCUMULATING = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.t.default, aten.transpose.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.add.Tensor, aten.sum.dim_IntList, aten._to_copy.default,
    torch.ops.prims.convert_element_type.default, operator.getitem,
})


def cotangent_dependent(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that read a ``tangents_*`` placeholder, directly or transitively."""
    dep: set[torch.fx.Node] = set()
    for node in graph.nodes:  # topological order
        if node.op == "placeholder":
            if str(node.target).startswith("tangents"):
                dep.add(node)
        elif any(inp in dep for inp in node.all_input_nodes):
            dep.add(node)
    return dep


class GradientFlow:
    """Tells parameter gradients from propagated ones in a joint graph.

    The joint graph returns its forward outputs, then one gradient per ``primals_*`` input.
    ``parameters[i]`` says whether primal ``i`` is a parameter; ``None`` (unknown, or a count that
    does not match the graph) counts every gradient output as a parameter's.
    """

    def __init__(self, graph: torch.fx.Graph, parameters: Optional[Sequence[bool]] = None) -> None:
        primals = [n for n in graph.nodes if n.op == "placeholder" and str(n.target).startswith("primals")]
        returned = graph.output_node().args[0]
        outputs = list(returned) if isinstance(returned, (list, tuple)) else [returned]
        grads = outputs[len(outputs) - len(primals):] if len(primals) <= len(outputs) else []
        if parameters is None or len(parameters) != len(grads):
            parameters = [True] * len(grads)
        self.parameter_grads = {g for g, is_param in zip(grads, parameters) if is_param and g is not None}

    def role(self, node: torch.fx.Node) -> Role:
        """``GRAD_WEIGHT`` if ``node``'s value only accumulates into parameter gradients."""
        pending, seen = [node], {node}
        while pending:
            current = pending.pop()
            for user in current.users:
                if user.op == "output":
                    if current not in self.parameter_grads:
                        return Role.GRAD_INPUT
                elif user.op == "call_function" and user.target in _ACCUMULATING:
                    if user not in seen:
                        seen.add(user)
                        pending.append(user)
                else:
                    return Role.GRAD_INPUT
        return Role.GRAD_WEIGHT


_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: torch.fx.Node) -> str:
    """The innermost forward module of a backward node, e.g. ``layers.2``; ``<root>`` for code in
    the compiled module's own ``forward``."""
    stack = node.meta.get("fwd_nn_module_stack") or node.meta.get("nn_module_stack")
    if not stack:
        return "<root>"
    return _DYNAMO_ROOT.sub("", list(stack.values())[-1][0]) or "<root>"


def shape_of(node: torch.fx.Node) -> Optional[torch.Size]:
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None


_FUSED_SDPA = "fused attention kernel: its VJP has no GEMM the pass can reach; exact"
FUSED_KERNELS: dict[str, str] = {
    "_scaled_dot_product_flash_attention_for_cpu_backward": _FUSED_SDPA,
    "_scaled_dot_product_flash_attention_backward": _FUSED_SDPA,
    "_scaled_dot_product_efficient_attention_backward": _FUSED_SDPA,
    "_scaled_dot_product_cudnn_attention_backward": _FUSED_SDPA,
    "_scaled_dot_product_fused_attention_overrideable_backward": _FUSED_SDPA,
    "_flash_attention_backward": _FUSED_SDPA,
    "_efficient_attention_backward": _FUSED_SDPA,
}
"""Backward kernels that hold gradient products the pass cannot reach, by ATen name: reported exact."""


def fused_kernels(graph: torch.fx.Graph, dependent: set[torch.fx.Node]) -> list[Unmatched]:
    """The cotangent-dependent nodes of ``graph`` that are :data:`FUSED_KERNELS`."""
    found = []
    for node in graph.nodes:
        name = getattr(node.target, "_opname", None)
        if node in dependent and name in FUSED_KERNELS:
            found.append(Unmatched(node, FUSED_KERNELS[name]))
    return found


def hoist(node: torch.fx.Node, before: torch.fx.Node) -> bool:
    """Move ``node`` (and what it reads that comes later) to just before ``before``, if it is a
    pure op: whether ``node`` now comes before ``before``. The joint graph is functional, so a pure
    op's place among its readers and inputs is free (a shared draw reads the later product's
    operands, such as the ``G^T`` its ``mm`` reads, from before the earlier product)."""
    if node.op != "call_function":
        return node < before
    if node < before:
        return True
    if node.is_impure() or not all(hoist(arg, before) for arg in node.all_input_nodes):
        return False
    before.prepend(node)
    return True
