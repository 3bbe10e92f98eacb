"""The GEMM family: gradient ``mm`` and ``bmm`` nodes, found by structure and rewritten.

Every backward ``mm(x, y)`` / ``bmm(x, y)`` with exactly one cotangent-dependent operand is the
VJP of a product: that operand is the cotangent ``G`` (``(..., rows, features)``), possibly
transposed. Which axis of ``G`` the product contracts decides the estimator:

* an axis the product contracts is sketched inside it (``x S y``: column-row sampling);
* an axis that runs along the output is sketched outside it (``S (x y)``: kept output rows).

Linear layers give 2-D ``mm`` nodes (``G @ W`` and ``G^T @ A``); products of two activations,
such as ``q @ k^T`` and ``attn @ v`` in hand-written attention, give ``bmm`` nodes whose two
gradients are both propagated (role ``grad_input``). A bmm draw is shared by the whole batch, so
the sampled product is a smaller dense bmm. The role (weight or propagated gradient) comes from
where the result flows (:class:`~.graph.GradientFlow`), not from the shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Optional, Union

import torch
import torch.fx
from torch import Tensor

from .._torch_private import size_hint
from ..config import SamplingConfig
from ..estimator_ops import CONTRACTED, sampled_gemm, sampled_size, sketched_gemm
from ..sketches import keep_count
from ..sketches.axis import axis_sketch
from ..sketches.matmul import sketched_matmul
from .graph import FEATURES, ROWS, GradientFlow, Role, Unmatched, module_path, shape_of
from .rules import AXIS_BY_NAME, SKETCH_TABLE, DrawKey, Product, decline

aten = torch.ops.aten

GEMMS = (aten.mm.default, aten.addmm.default, aten.bmm.default)
_SAMPLED = {aten.mm.default: 2, aten.bmm.default: 3}  # op -> rank of its operands
_TRANSPOSES = (aten.permute.default, aten.t.default, aten.transpose.int)


@dataclasses.dataclass(frozen=True)
class GemmSite:
    """One backward ``mm``/``bmm`` recognised as the VJP of a product."""

    node: torch.fx.Node
    cotangent: torch.fx.Node  # G, (..., rows, features)
    cotangent_arg: int  # 0 if G (or G^T) is x, 1 if it is y
    contracted: int  # ROWS or FEATURES: the axis of G the product sums over
    role: Role

    def output_dim(self, axis: int) -> int:
        """The matrix dim (0 rows, 1 columns) of the output that runs along ``axis`` of G."""
        assert axis != self.contracted
        return self.cotangent_arg

    def out_dim(self, axis: int) -> Optional[int]:
        """The output dim sampling ``axis`` of G runs along, or ``None`` when the GEMM contracts it."""
        return None if axis == self.contracted else self.output_dim(axis)

    def product(self, axis: int) -> Product:
        """The GEMM's sizes, with ``axis`` of G as the sampled dim, for the cost rule."""
        m, inner, n_out = gemm_dims(self.node)
        s, x, y = {None: (inner, m, n_out), 0: (m, inner, n_out), 1: (n_out, m, inner)}[self.out_dim(axis)]
        return Product(self.node.meta["val"].device.type, "gemm", s, x, y, gemm_batch(self.node))


def _swaps_last_two(node: torch.fx.Node) -> bool:
    """Whether ``node`` transposes the last two dims of its input and nothing else."""
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return False
    shape = shape_of(node)
    if shape is None:
        return False
    rank = len(shape)
    if node.target is aten.t.default:
        return True
    if node.target is aten.permute.default:
        return list(node.args[1]) == [*range(rank - 2), rank - 1, rank - 2]
    return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]


def match_gemm(node: torch.fx.Node, dependent: set[torch.fx.Node], flow: GradientFlow) -> Union[GemmSite, Unmatched]:
    """Classify one cotangent-dependent GEMM node."""
    rank = _SAMPLED.get(node.target)
    if rank is None:
        return Unmatched(node, f"{node.target} in the backward is not sampled (mm and bmm are)")
    x, y = node.args
    deps = [arg in dependent for arg in (x, y)]
    if all(deps):
        return Unmatched(node, "both operands depend on the cotangent (a product of two gradients)")
    arg = deps.index(True)
    operand = (x, y)[arg]
    transposed = _swaps_last_two(operand)
    g = operand.args[0] if transposed else operand
    if shape_of(g) is None or len(shape_of(g)) != rank:
        return Unmatched(node, f"cotangent operand is not a {rank}-D tensor")
    # x's contracted dim is its last, y's its second-to-last; a transpose swaps them.
    contracted = (FEATURES if arg == 0 else ROWS) ^ int(transposed)
    return GemmSite(node, g, arg, contracted, flow.role(node))


def gemm_sites(graph: torch.fx.Graph, dependent: set[torch.fx.Node],
               flow: GradientFlow) -> tuple[list[GemmSite], list[Unmatched]]:
    """Every cotangent-dependent GEMM of ``graph``, split into recognised sites and the rest."""
    sites: list[GemmSite] = []
    unmatched: list[Unmatched] = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in GEMMS and node in dependent:
            found = match_gemm(node, dependent, flow)
            (sites if isinstance(found, GemmSite) else unmatched).append(found)
    return sites, unmatched


def _operands(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    return node.args[1:3] if node.target is aten.addmm.default else node.args[:2]


def gemm_dims(node: torch.fx.Node) -> tuple[int, int, int]:
    """``(M, K, N)`` of ``x: (..., M, K) @ y: (..., K, N)``, symbolic sizes at their example values."""
    x, y = (shape_of(a) for a in _operands(node))
    return size_hint(x[-2]), size_hint(x[-1]), size_hint(y[-1])


def gemm_batch(node: torch.fx.Node) -> int:
    """The number of matrix products a (b)mm node computes."""
    return math.prod(size_hint(d) for d in shape_of(_operands(node)[0])[:-2])


def gemm_flops(node: torch.fx.Node) -> int:
    """``2 * M * K * N`` times the batch."""
    m, k, n = gemm_dims(node)
    return 2 * m * k * n * gemm_batch(node)


@dataclasses.dataclass(frozen=True)
class GemmRewrite:
    """An accepted rewrite of a GEMM: keep a fraction ``p`` of ``axis`` of the site's cotangent.

    ``n`` and ``k`` are the example sizes (for the report); the inserted nodes compute both from
    the tensors' shapes, so a symbolic (dynamic) size stays symbolic.
    """

    site: GemmSite
    axis: int
    p: float
    sketch: str
    n: int
    k: int
    shared_dims: tuple[int, ...] = ()  # the op_dims of the later products that read this one's draw
    strata: ClassVar[int] = 1  # GEMM draws are never stratified

    @property
    def out_dim(self) -> Optional[int]:
        """The output dim the sampled axis runs along, or ``None`` when the GEMM contracts it."""
        return self.site.out_dim(self.axis)

    @property
    def draw_key(self) -> DrawKey:
        """What the draw draws: ``axis`` is one of the last two dims of ``G`` (``(..., rows, features)``)."""
        dim = len(shape_of(self.site.cotangent)) - 2 + self.axis
        return DrawKey(self.site.cotangent, dim, self.n, self.strata, self.sketch)

    @property
    def op_dim(self) -> int:
        """:attr:`out_dim` as the estimator ops take it (``CONTRACTED`` for ``None``)."""
        return CONTRACTED if self.out_dim is None else self.out_dim

    def size(self, x: Tensor, y: Tensor) -> int:
        return sampled_size(x, y, self.op_dim)

    def anchor(self, x: Tensor, y: Tensor) -> Tensor:
        return (x, y)[self.site.cotangent_arg]

    def drawing_estimator(self, site: int) -> Optional[Callable[..., tuple[Tensor, tuple[Tensor, Tensor]]]]:
        """``(x, y, seed, *shared) -> (estimate of x @ y, (idx, scale))``: the draw ``site`` and the
        product as one op (:func:`~ubcompile.estimator_ops.sampled_gemm`); ``None`` for a projection.
        ``shared`` are the operands of the products that read the draw too, in the order of
        :attr:`shared_dims`."""
        if SKETCH_TABLE[self.sketch].projects:
            return None
        op_dim, sketch, p, shared_dims = self.op_dim, self.sketch, self.p, self.shared_dims

        def estimate(x: Tensor, y: Tensor, seed: Tensor, *shared: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            k = keep_count(sampled_size(x, y, op_dim), p)
            out, idx, scale = sampled_gemm(x, y, op_dim, sketch, k, seed, site, list(shared), list(shared_dims))
            return out, (idx, scale)

        return estimate

    def estimator(self) -> Callable[..., Tensor]:
        """``(x, y, *sketch tensors) -> estimate of x @ y``: ``x S y``, ``S (x y)`` or ``(x y) S``.

        For a diagonal sketch (one opaque op, :mod:`ubcompile.estimator_ops`), the product that
        reuses another's draw; a projection's three GEMMs are left to Inductor."""
        out_dim, op_dim = self.out_dim, self.op_dim
        if not SKETCH_TABLE[self.sketch].projects:
            return lambda x, y, idx, scale: sketched_gemm(x, y, idx, scale, op_dim)
        return lambda x, y, *drawn: sketched_matmul(x, y, axis_sketch(*drawn), out_dim)

    def sampled_flops(self) -> int:
        """GEMM FLOPs of the rewritten product."""
        m, k_inner, n_out = gemm_dims(self.site.node)
        if SKETCH_TABLE[self.sketch].projects:
            # The three GEMMs through the k-dimensional projection.
            a, n, b = {None: (m, k_inner, n_out), 0: (k_inner, m, n_out), 1: (m, n_out, k_inner)}[self.out_dim]
            return 2 * self.k * (a * n + n * b + a * b) * gemm_batch(self.site.node)
        return gemm_flops(self.site.node) * self.k // self.n


def plan_gemm(site: GemmSite, config: SamplingConfig) -> Union[GemmRewrite, str]:
    """The rewrite for ``site`` under ``config``, or the reason it stays exact."""
    axis = AXIS_BY_NAME[config.axis]
    n = size_hint(site.cotangent.meta["val"].shape[axis - 2])
    reason = decline(config, site.role, module_path(site.node), n, product=site.product(axis))
    if reason is not None:
        return reason
    k = keep_count(n, config.p)
    rewrite = GemmRewrite(site, axis, config.p, config.sketch, n, k)
    if rewrite.sampled_flops() >= gemm_flops(site.node):
        return f"a rank-{k} {config.sketch} projection costs more than the exact GEMM"
    return rewrite
