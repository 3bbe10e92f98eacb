"""The ``p="auto"`` family: backward GEMMs and convolution gradients handed to the run-time controller.

A weight gradient ``G^T A`` of a linear layer contracts the cotangent's batch/token rows, and a
convolution's weight gradient its batch: the controller samples them. Under ``p="auto"`` the pass
replaces the product by one call of ``torch.ops.ubcompile.auto_contraction`` (a GEMM) or
``auto_conv_weight`` (a convolution), whose output has the exact product's shape, so the graph
stays static while the controller (:mod:`ubcompile.auto`) decides at every call. A propagated
gradient ``G W`` stays the graph's own exact ``mm`` or convolution backward (its noise would reach
every earlier layer), counted at its exact FLOPs by the report, unless ``grad="both"`` hands it to
the controller too: a linear layer's, over a plain batch's rows (one per sample), becomes
``auto_propagated``, which computes the rows of the output the controller keeps.
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
from ..sketches.conv import BATCH
from .conv import ConvSite, bias_grad, conv_product, narrow_exact
from .gemm import GemmSite
from .graph import ROWS, Role, module_path, shape_of
from .inline import inline_call
from .rules import Draws, decline, site_name

aten = torch.ops.aten

PROPAGATED = ("p='auto' keeps propagated gradients exact unless grad='both': their noise would reach every "
              "earlier layer")
PROPAGATED_CONV = "p='auto' keeps a convolution's propagated gradient exact: its noise would reach every earlier layer"

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
             aten.permute.default, aten.transpose.int, aten.clone.default)


@dataclasses.dataclass(frozen=True)
class AdaptiveRewrite:
    """An ``mm`` handed to the controller: a weight gradient whose ``n`` contracted rows it samples
    (the rows of ``samples`` samples: a node whose dim 0 is the batch of a flattened
    ``(batch, tokens, ..., features)`` activation, or ``None`` for one row per sample), or with
    ``out_dim`` (0 or 1) a propagated gradient whose ``n`` output rows (samples) along that dim it samples."""

    site: GemmSite
    n: int
    samples: Optional[torch.fx.Node] = None
    out_dim: Optional[int] = None

    def insert(self, graph: torch.fx.Graph, draws: Draws) -> None:
        """Replace the product by the controlled op, which finds its site in the controller of the
        stream ``draws.handle`` names when it runs (by module and ordinal among the graph's
        products of that module: nothing process-local enters the graph) and draws from ``draws.seed``.
        The number of samples is read at run time, so a dynamic sequence length groups each call's
        rows by its own length."""
        node = self.site.node
        module, ordinal, index = _place(node, draws)
        out_dim, upstream = self.out_dim, _upstream(self.site.cotangent, draws)
        graph_id = draws.graph_id

        def controlled(x: Tensor, y: Tensor, seed: Tensor, handle: Tensor, *samples: Tensor) -> Tensor:
            if out_dim is not None:
                return torch.ops.ubcompile.auto_propagated(x, y, seed, handle, module, ordinal, index, out_dim,
                                                           graph_id, upstream)
            count = samples[0].shape[0] if samples else y.shape[0]
            return torch.ops.ubcompile.auto_contraction(x, y, seed, handle, module, ordinal, index, count, graph_id,
                                                        upstream)

        operands = [*node.args, draws.seed, draws.handle, *([self.samples] if self.samples else [])]
        with graph.inserting_before(node):
            call = inline_call(graph, controlled, operands, meta_from=node)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        if out_dim is not None:
            draws.propagated[call] = site_name(module, ordinal)


def _upstream(cotangent: torch.fx.Node, draws: Draws) -> str:
    """The sites (:func:`site_name`, ``/``-separated: an op takes no list of strings) of the
    controlled propagated gradients (:attr:`Draws.propagated`) that ``cotangent`` is computed from:
    the draws whose noise reaches this product. The controller prices and checks a draw at these
    products alone (:class:`ubcompile.auto.controller.Propagation`)."""
    if not draws.propagated:
        return ""
    seen, todo = {cotangent}, [cotangent]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return "/".join(sorted(name for node, name in draws.propagated.items() if node in seen))


def _place(node: torch.fx.Node, draws: Draws) -> tuple[str, int, int]:
    """A new controlled op's site in its graph: the module of ``node``, its ordinal among that
    module's controlled ops and its index among all of them (the key of its draws); recorded in ``draws``."""
    module = module_path(node)
    place = (module, draws.controlled.count(module), len(draws.controlled))
    draws.controlled.append(module)
    return place


@dataclasses.dataclass(frozen=True)
class AdaptiveConvRewrite:
    """A convolution's weight gradient handed to the controller, which samples its ``n`` samples."""

    site: ConvSite
    n: int

    def insert(self, graph: torch.fx.Graph, draws: Draws) -> None:
        """Replace the weight gradient's output of the node by the controlled op (as
        :meth:`AdaptiveRewrite.insert`) and its bias gradient, if any, by a sum; the node keeps
        computing the input gradient, exact, or goes."""
        site = self.site
        module, ordinal, index = _place(site.node, draws)
        geometry = [list(v) if isinstance(v, tuple) else v for v in dataclasses.astuple(site.geometry)]
        upstream, graph_id = _upstream(site.node.args[0], draws), draws.graph_id

        def controlled(g: Tensor, x: Tensor, w: Tensor, seed: Tensor,
                       handle: Tensor) -> tuple[Tensor, Optional[Tensor]]:
            grad_weight = torch.ops.ubcompile.auto_conv_weight(g, x, w, seed, handle, module, ordinal, index,
                                                               *geometry, graph_id, upstream)
            return grad_weight, bias_grad(g) if site.outputs[2] is not None else None

        with graph.inserting_before(site.node):
            calls = inline_call(graph, controlled, [*site.node.args[:3], draws.seed, draws.handle], meta_from=site.node)
        for output, call in zip(site.outputs[1:], calls):
            if call is not None:
                output.replace_all_uses_with(call)
                graph.erase_node(output)
        narrow_exact(site, (False, True))


def plan_adaptive_conv(site: ConvSite, config: SamplingConfig) -> tuple[Optional[AdaptiveConvRewrite], dict[int, str]]:
    """The controlled rewrite of ``site``'s weight gradient under ``p="auto"`` (or ``None``), and the
    reason each gradient left to the node stays exact (by output index, as :func:`~.conv.plan_conv`)."""
    product = conv_product(site, BATCH)
    n = product.s // product.span
    reasons = {}
    for output, role in enumerate(site.roles):
        if role is None:
            continue
        reason = PROPAGATED_CONV if role is Role.GRAD_INPUT else decline(config, role, module_path(site.node), n,
                                                                      span=product.s, product=product)
        if reason is None and n < 1 / LEVELS[-1]:
            reason = f"{n} samples are too few to sample"
        if reason is not None:
            reasons[output] = reason
    weight = [output for output, role in enumerate(site.roles) if role is Role.GRAD_WEIGHT and output not in reasons]
    return (AdaptiveConvRewrite(site, n) if weight == [1] else None), reasons


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
    propagated = site.role is Role.GRAD_INPUT
    if propagated and config.grad != "both":
        return PROPAGATED
    if propagated and site.node.target is not aten.mm.default:
        return "p='auto' controls 2-D propagated gradients only (a bmm's stay exact)"
    n = size_hint(site.cotangent.meta["val"].shape[-2])
    product = site.product(ROWS)
    if propagated:  # its options are the norm sketch's, priced as a propagated product (ubcompile.auto.policy)
        product = product._replace(op="propagated")
    reason = decline(config, site.role, module_path(site.node), n, product=product)
    if reason is not None:
        return reason
    if not propagated and (site.node.target is not aten.mm.default or site.contracted != ROWS):
        return "p='auto' controls 2-D weight-gradient products over batch/token rows only"
    if n < 1 / LEVELS[-1]:
        return f"{n} rows are too few to sample"
    if propagated:
        if sample_batch(site.cotangent, n) is not None:
            return ("p='auto' samples propagated gradients over a plain batch's rows only: these rows are tokens, "
                    "whose gradients attention mixes")
        return AdaptiveRewrite(site, n, out_dim=site.output_dim(ROWS))
    activation = site.node.args[1 - site.cotangent_arg]
    return AdaptiveRewrite(site, n, sample_batch(activation, n))
