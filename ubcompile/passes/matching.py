"""Find the gradient GEMMs of linear layers in an AOTAutograd joint graph, by structure.

A node is *cotangent-dependent* when it reads, directly or not, a ``tangents_*`` input. Every
backward ``mm(x, y)`` with exactly one cotangent-dependent operand is a linear-layer gradient:
that operand is the layer's output cotangent ``G`` (2-D, ``rows x features``), possibly transposed.
Which axis of ``G`` the product contracts tells the two gradients apart:

* features contracted: ``G @ W``, the input gradient (``grad_input``);
* rows contracted: ``G^T @ A`` (or ``A^T @ G``), the weight gradient (``grad_weight``).

Shapes alone cannot tell them apart when batch = in = out; structure can.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Union

import torch
import torch.fx

from .._torch_private import size_hint

aten = torch.ops.aten

ROWS, FEATURES = 0, 1
"""The axes of a cotangent ``G`` of shape ``(rows, features)``."""

_TRANSPOSES = (aten.permute.default, aten.t.default, aten.transpose.int)
_GEMMS = (aten.mm.default, aten.addmm.default, aten.bmm.default)


class Role(str, enum.Enum):
    GRAD_INPUT = "grad_input"
    GRAD_WEIGHT = "grad_weight"


@dataclasses.dataclass(frozen=True)
class GemmSite:
    """One backward ``mm(x, y)`` recognised as a linear-layer gradient."""

    node: torch.fx.Node
    cotangent: torch.fx.Node  # G, 2-D (rows, features)
    cotangent_arg: int  # 0 if G (or G^T) is x, 1 if it is y
    contracted: int  # ROWS or FEATURES: the axis of G the product sums over

    @property
    def role(self) -> Role:
        return Role.GRAD_WEIGHT if self.contracted == ROWS else Role.GRAD_INPUT

    def output_dim(self, axis: int) -> int:
        """The dim of the mm's output that runs along ``axis`` of G (axis must not be contracted)."""
        assert axis != self.contracted
        return self.cotangent_arg


@dataclasses.dataclass(frozen=True)
class Unmatched:
    """A backward GEMM the pass does not understand, kept exact."""

    node: torch.fx.Node
    reason: str


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


def _is_transpose(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


def _shape(node: torch.fx.Node) -> Optional[torch.Size]:
    val = node.meta.get("val")
    return val.shape if isinstance(val, torch.Tensor) else None


def match_gemm(node: torch.fx.Node, dependent: set[torch.fx.Node]) -> Union[GemmSite, Unmatched]:
    """Classify one cotangent-dependent GEMM node."""
    if node.target is not aten.mm.default:
        return Unmatched(node, f"{node.target} is not sampled yet (only 2-D mm)")
    x, y = node.args
    deps = [arg in dependent for arg in (x, y)]
    if all(deps):
        return Unmatched(node, "both operands depend on the cotangent (activation x activation)")
    arg = deps.index(True)
    operand = (x, y)[arg]
    transposed = _is_transpose(operand)
    g = operand.args[0] if transposed else operand
    if _shape(g) is None or len(_shape(g)) != 2:
        return Unmatched(node, "cotangent operand is not a 2-D tensor")
    # x's contracted dim is 1, y's is 0; a transpose swaps which axis of G that is.
    contracted_dim_of_operand = 1 if arg == 0 else 0
    contracted = contracted_dim_of_operand ^ int(transposed)
    return GemmSite(node, g, arg, ROWS if contracted == 0 else FEATURES)


def backward_gemms(graph: torch.fx.Graph) -> tuple[list[GemmSite], list[Unmatched]]:
    """Every cotangent-dependent GEMM of ``graph``, split into recognised sites and the rest."""
    dependent = cotangent_dependent(graph)
    sites: list[GemmSite] = []
    unmatched: list[Unmatched] = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _GEMMS and node in dependent:
            found = match_gemm(node, dependent)
            (sites if isinstance(found, GemmSite) else unmatched).append(found)
    return sites, unmatched


def gemm_dims(node: torch.fx.Node) -> tuple[int, int, int]:
    """``(M, K, N)`` of ``mm(x: M x K, y: K x N)``, symbolic sizes at their example values."""
    x, y = (_shape(a) for a in node.args[:2])
    return size_hint(x[0]), size_hint(x[1]), size_hint(y[1])
