"""The convolution family: ``aten.convolution_backward`` nodes, rewritten per gradient.

A ``convolution_backward(G, x, w, ..., output_mask)`` node computes up to three gradients, read
through ``getitem`` 0 (``x``), 1 (``w``) and 2 (bias). Each of the first two is sampled or kept
exact on its own (its role comes from where it flows, as for GEMMs); the bias gradient, a cheap
sum, stays exact. The sampled gradients come from one smaller convolution backward on the kept
channels or samples (:mod:`ubcompile.sketches.conv`); the original node keeps computing the exact
ones, with its ``output_mask`` narrowed, and disappears when nothing is left for it. The bias
gradient moves out of it into a plain sum: on CPU a ``convolution_backward`` asked for the bias
alone costs as much as a full one (measured 135 ms against 0.9 ms for the sum, 32x128x32x32).

The ``features`` axis of ``G`` is its output channels; ``rows`` is its batch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.fx
from torch import Tensor

from .._torch_private import size_hint
from ..config import SamplingConfig
from ..sketches.axis import axis_sketch
from ..estimator_ops import sampled_conv_backward, sketched_conv_backward
from ..sketches.conv import BATCH, CHANNELS, SKETCHED_VJPS, ConvGeometry, implicit_gemm_sizes
from .graph import FEATURES, ROWS, GradientFlow, Role, module_path, shape_of
from .rules import AXIS_BY_NAME, SKETCH_TABLE, DrawKey, Product, decline, sample_size

aten = torch.ops.aten

_AXIS_OF_G = {FEATURES: CHANNELS, ROWS: BATCH}


@dataclasses.dataclass(frozen=True)
class ConvSite:
    """One ``convolution_backward`` node whose cotangent depends on the tangents."""

    node: torch.fx.Node
    outputs: tuple[Optional[torch.fx.Node], ...]  # getitem 0, 1 and 2 (bias), where used
    roles: tuple[Optional[Role], Optional[Role]]
    geometry: ConvGeometry

    @property
    def cotangent(self) -> torch.fx.Node:
        return self.node.args[0]


def conv_sites(graph: torch.fx.Graph, dependent: set[torch.fx.Node], flow: GradientFlow) -> list[ConvSite]:
    sites = []
    for node in graph.nodes:
        if node.target is aten.convolution_backward.default and node.args[0] in dependent:
            getitems = {u.args[1]: u for u in node.users if u.target is operator.getitem}
            outputs = (getitems.get(0), getitems.get(1), getitems.get(2))
            roles = tuple(flow.role(out) if out is not None else None for out in outputs[:2])
            geometry = ConvGeometry.of(*node.args[4:10])
            sites.append(ConvSite(node, outputs, roles, geometry))
    return sites


def _gemm_sizes(site: ConvSite) -> tuple[int, int, int]:
    """``(rows, channels of G, per_channel)`` of the implicit GEMMs (:func:`implicit_gemm_sizes`):
    a row per batch sample and position, and a weight slice's size."""
    batch, channels, positions, per_channel = _implicit_gemm(site)
    return batch * positions, channels, per_channel


def _operand_sizes(site: ConvSite) -> list[list[int]]:
    """The example sizes of ``G``, ``x`` and ``w``."""
    return [[size_hint(d) for d in shape_of(a)] for a in site.node.args[:3]]


def _implicit_gemm(site: ConvSite) -> tuple[int, int, int, int]:
    """:func:`~ubcompile.sketches.conv.implicit_gemm_sizes` at the example sizes."""
    return implicit_gemm_sizes(*_operand_sizes(site), site.geometry.transposed)


def conv_dims(site: ConvSite, output: int) -> tuple[int, int, int]:
    """``(M, K, N)`` of the implicit GEMM of gradient ``output`` (0: input, 1: weight)."""
    rows, channels, per_channel = _gemm_sizes(site)
    return (rows, channels, per_channel) if output == 0 else (channels, rows, per_channel)


def conv_product(site: ConvSite, g_axis: int) -> Product:
    """The implicit GEMM's sizes with ``g_axis`` of ``G`` sampled, for the cost rule. Sampling the
    batch reads ``G`` and ``x``; sampling channels, ``G`` and the weight (a GEMM's count)."""
    sizes = _operand_sizes(site)
    batch, channels, positions, per_channel = implicit_gemm_sizes(*sizes, site.geometry.transposed)
    rows, device = batch * positions, site.cotangent.meta["val"].device.type
    if g_axis == BATCH:
        elements = math.prod(sizes[0]) + math.prod(sizes[1])
        return Product(device, "conv", rows, channels, per_channel, span=positions, elements=elements)
    return Product(device, "conv", channels, rows, per_channel)


def conv_flops(site: ConvSite, output: int) -> int:
    m, k, n = conv_dims(site, output)
    return 2 * m * k * n


@dataclasses.dataclass(frozen=True)
class ConvRewrite:
    """Sample ``axis`` of the site's cotangent for the gradients in ``sampled`` (by output index)."""

    site: ConvSite
    sampled: tuple[bool, bool]
    axis: int  # ROWS or FEATURES of G
    p: float
    sketch: str
    n: int
    k: int
    strata: int  # groups, when channels are sampled: each group keeps k / groups of its channels

    @property
    def g_axis(self) -> int:
        return _AXIS_OF_G[self.axis]

    @property
    def draw_key(self) -> DrawKey:
        """What the draw draws: ``axis`` is one of the first two dims of ``G`` (``(batch, channels, ...)``)."""
        return DrawKey(self.site.cotangent, self.g_axis, self.n, self.strata, self.sketch)

    def size(self, g: Tensor, x: Tensor, w: Tensor) -> int:
        return g.shape[self.g_axis]

    def anchor(self, g: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return g

    def estimator(self) -> Callable[..., tuple[Optional[Tensor], ...]]:
        """``(g, x, w, *sketch tensors) -> (grad_input, grad_weight, grad_bias)``: the sampled
        estimates (``None`` where not sampled) and the exact bias gradient (if used).

        For a diagonal sketch (one opaque op, :mod:`ubcompile.estimator_ops`), the gradients from
        another product's draw; a projection is left to Inductor."""
        axis, geometry, sampled = self.g_axis, self.site.geometry, self.sampled
        projects = SKETCH_TABLE[self.sketch].projects

        def grads(g: Tensor, x: Tensor, w: Tensor, *drawn: Tensor) -> tuple[Optional[Tensor], ...]:
            if projects:
                return SKETCHED_VJPS[axis](g, x, w, axis_sketch(*drawn), geometry, sampled)
            out = sketched_conv_backward(g, x, w, *drawn, *dataclasses.astuple(geometry), axis, list(sampled))
            return self._kept(out)

        def estimate(g: Tensor, x: Tensor, w: Tensor, *drawn: Tensor) -> tuple[Optional[Tensor], ...]:
            return (*grads(g, x, w, *drawn), self._grad_bias(g))

        return estimate

    def drawing_estimator(self, site: int) -> Optional[Callable[..., tuple[tuple[Optional[Tensor], ...], tuple[Tensor, Tensor]]]]:
        """``(g, x, w, seed) -> ((grad_input, grad_weight, grad_bias), (idx, scale))``: the draw
        ``site`` and the sampled gradients as one op
        (:func:`~ubcompile.estimator_ops.sampled_conv_backward`, which draws for both gradients);
        ``None`` for a projection."""
        if SKETCH_TABLE[self.sketch].projects:
            return None

        def estimate(g: Tensor, x: Tensor, w: Tensor, seed: Tensor) -> tuple[tuple[Optional[Tensor], ...], tuple[Tensor, Tensor]]:
            k = sample_size(g.shape[self.g_axis], self.p, self.strata)  # symbolic under a dynamic batch
            *out, idx, scale = sampled_conv_backward(
                g, x, w, *dataclasses.astuple(self.site.geometry), self.g_axis, list(self.sampled), self.sketch,
                k, self.strata, seed, site)
            return (*self._kept(out), self._grad_bias(g)), (idx, scale)

        return estimate

    def _kept(self, grads: Sequence[Tensor]) -> tuple[Optional[Tensor], ...]:
        """The sampled ones of an op's ``(grad_input, grad_weight)``; ``None`` for the empty placeholders."""
        return tuple(t if keep else None for t, keep in zip(grads, self.sampled))

    def _grad_bias(self, g: Tensor) -> Optional[Tensor]:
        """The exact bias gradient, if the convolution has one."""
        return bias_grad(g) if self.site.outputs[2] is not None else None

    def sampled_flops(self, output: int) -> int:
        exact = conv_flops(self.site, output)
        if not self.sampled[output]:
            return exact
        flops = exact * self.k // self.n
        if SKETCH_TABLE[self.sketch].projects:  # moving G, the co-operand and the result through Omega
            g, x, w = (math.prod(size_hint(d) for d in shape_of(a)) for a in self.site.node.args[:3])
            flops += 2 * self.k * (g + (w if self.g_axis == CHANNELS else x) + (w, x)[1 - output])
        return flops


def _geometry_reason(site: ConvSite, g_axis: int, sketch: str) -> Optional[str]:
    """Why channel sampling cannot respect this convolution's groups, if it cannot."""
    groups = site.geometry.groups
    if g_axis != CHANNELS or groups == 1:
        return None
    if site.geometry.transposed:
        return (f"transposed convolution with groups={groups}: its groups share the kept channels' "
                "weights; axis='rows' samples its batch")
    if SKETCH_TABLE[sketch].projects:
        return f"a {sketch} projection would mix the channels of the {groups} groups; axis='rows' samples the batch"
    return None


def _linear_only(config: SamplingConfig) -> Optional[str]:
    """Why ``config`` leaves every convolution exact, if it does."""
    if config.draws_in_forward:
        return "the activation sketch samples linear layers only; convolutions stay exact"
    return None


def plan_conv(site: ConvSite, config: SamplingConfig) -> tuple[Optional[ConvRewrite], dict[int, str]]:
    """The rewrite of ``site`` (or ``None``), and the reason each unsampled gradient stays exact.

    Channel sampling of a grouped convolution is stratified: each group keeps the same number of
    its own channels, so the sampled convolution keeps the groups.
    """
    axis = AXIS_BY_NAME[config.axis]
    g_axis = _AXIS_OF_G[axis]
    n = size_hint(shape_of(site.cotangent)[g_axis])
    span = n * _implicit_gemm(site)[2] if g_axis == BATCH else n  # a sample spans its positions' GEMM rows
    strata = site.geometry.groups if g_axis == CHANNELS else 1
    reasons: dict[int, str] = {}
    for output, role in enumerate(site.roles):
        if role is None:
            continue
        reason = decline(config, role, module_path(site.node), n, strata, span, conv_product(site, g_axis))
        reason = reason or _linear_only(config) or _geometry_reason(site, g_axis, config.sketch)
        if reason is not None:
            reasons[output] = reason
    sampled = tuple(role is not None and output not in reasons for output, role in enumerate(site.roles))
    if not any(sampled):
        return None, reasons
    rewrite = ConvRewrite(site, sampled, axis, config.p, config.sketch, n, sample_size(n, config.p, strata), strata)
    for output in (0, 1):
        if sampled[output] and rewrite.sampled_flops(output) >= conv_flops(site, output):
            return None, {**reasons, output: f"a rank-{rewrite.k} {config.sketch} projection costs more "
                                             "than the exact convolution"}
    return rewrite, reasons


def bias_grad(g: Tensor) -> Tensor:
    """A convolution's exact bias gradient: ``G`` summed over all but its channels."""
    return g.sum([0, *range(2, g.dim())])


def narrow_exact(site: ConvSite, sampled: tuple[bool, bool]) -> None:
    """Stop the original node from computing what a rewrite now provides (the sampled gradients
    and the bias gradient); erase it if nothing is left."""
    node = site.node
    mask = [bool(m) and i < 2 and not sampled[i] for i, m in enumerate(node.args[10])]
    if not any(mask):
        node.graph.erase_node(node)
        return
    node.update_arg(10, mask)
    node.meta["val"] = tuple(v if keep else None for v, keep in zip(node.meta["val"], mask))
