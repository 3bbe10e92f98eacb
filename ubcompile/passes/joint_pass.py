"""The joint-graph pass: replace recognised gradient products by sampled, smaller ones.

Two rewrite families, GEMMs (:mod:`.gemm`) and convolutions (:mod:`.conv`), share a draw where
they draw the same thing (one :class:`~.rules.DrawKey`: the cotangent, its sampled dim, length,
strata and sketch). Every site is planned first, so that a norm draw shared by several GEMMs (a
layer's two gradients under ``grad="both"``) is drawn from all of their operands; then sites are
rewritten in graph order, so a shared draw is inserted before all of its users. Every gradient
node the pass sees is reported, sampled or with the reason it stayed exact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx

from .. import cost_model
from .._torch_private import CustomGraphPass
from ..config import SamplingConfig
from ..report import GemmEntry, GraphReport
from .adaptive import AdaptiveConvRewrite, AdaptiveRewrite, plan_adaptive, plan_adaptive_conv
from .conv import ConvRewrite, ConvSite, conv_dims, conv_flops, conv_sites, narrow_exact, plan_conv
from .forward_rows import ForwardRowsRewrite, plan_forward_rows
from .gemm import GEMMS, GemmRewrite, GemmSite, gemm_dims, gemm_flops, gemm_sites, plan_gemm
from .graph import GradientFlow, Role, Unmatched, cotangent_dependent, fused_kernels, hoist, module_path
from .inline import inline_call
from .seed_input import seed_node
from .rules import AXIS_NAMES, SKETCH_TABLE, DrawKey, Draws

Rewrite = Union[GemmRewrite, AdaptiveRewrite, ForwardRowsRewrite]
ConvPlan = Union[ConvRewrite, AdaptiveConvRewrite]


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """Hash of every source file of the package: any code change invalidates compiled graphs."""
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class RewriteError(RuntimeError):
    """A rewrite raised under ``strict=True`` (otherwise its gradient is kept exact, with a warning)."""


class JointSamplingPass(CustomGraphPass):
    """Rewrites an AOTAutograd joint graph in place and reports what it did to ``on_report``.

    A rewrite that raises is undone: that gradient stays exact, ``on_fallback(node, reason)`` is
    told, and the report gives the reason; with ``config.strict`` the error propagates instead.

    ``parameters[i]`` says whether the graph's ``i``-th input is a parameter (see
    :class:`~.graph.GradientFlow`); ``None`` treats every input gradient as a parameter's.
    ``seed_input`` is the position of the graph's seed input (:mod:`.seed_input`), from which
    every draw derives; under ``p="auto"`` the stream handle input follows it.
    """

    def __init__(self, config: SamplingConfig, on_report: Callable[[GraphReport], None],
                 parameters: Optional[Sequence[bool]] = None,
                 on_fallback: Optional[Callable[[torch.fx.Node, str], None]] = None, *, seed_input: int) -> None:
        self.config = config
        self.seed_input = seed_input
        self.on_report = on_report
        self.on_fallback = on_fallback or (lambda node, reason: None)
        self.parameters = None if parameters is None else tuple(parameters)

    def uuid(self) -> str:
        # The graph is a pure function of its inputs (the seed and handle among them): nothing
        # process-local enters its key. The cost models decide as the options do (a user may enter
        # a device's fitted model in the table at run time).
        return f"ubcompile-{self.config!r}-{self.parameters}-{cost_model.MODELS!r}-{_source_hash()}"

    def __call__(self, graph: torch.fx.Graph) -> None:
        start = time.perf_counter()
        dependent = cotangent_dependent(graph)
        flow = GradientFlow(graph, self.parameters)
        gemms, unmatched = gemm_sites(graph, dependent, flow)
        sites = sorted([*gemms, *conv_sites(graph, dependent, flow)], key=lambda site: site.node)
        entries = [_exact_entry(u) for u in unmatched + fused_kernels(graph, dependent)]
        handle = seed_node(graph, self.seed_input + 1) if self.config.adaptive else None
        draws = Draws(seed_node(graph, self.seed_input), handle)
        plans = [self._plan(site, dependent) if isinstance(site, GemmSite) else self._plan_conv(site) for site in sites]
        shared = _share_draws(plans)
        for site, plan in zip(sites, plans):
            if isinstance(site, GemmSite):
                entries += self._sample_gemm(graph, site, plan, draws, shared)
            else:
                entries += self._sample_conv(graph, site, plan, draws)
        # A safety net no rewrite's ordering can trip: each inserts its nodes just before the node it
        # replaces, reading that node's operands and draws checked (in _draw, guarded) to precede it.
        graph.lint()
        self.on_report(GraphReport(entries, joint_code=graph.python_code("self").src,
                                   pass_seconds=time.perf_counter() - start))

    def _sample_gemm(self, graph: torch.fx.Graph, site: GemmSite, decision: Union[Rewrite, str], draws: Draws,
                     shared: SharedDraws) -> list[GemmEntry]:
        """Rewrite ``site`` as ``decision`` says; its report entry."""
        entry = _gemm_entry(site.node, site.role, decision)  # before the rewrite erases the node
        if isinstance(decision, str):
            return [entry]
        failed = self._guarded(graph, site.node, draws, functools.partial(self._rewrite_gemm, graph, decision, draws, shared))
        return [entry if failed is None else _gemm_entry(site.node, site.role, failed)]

    def _sample_conv(self, graph: torch.fx.Graph, site: ConvSite, plan: tuple[Optional[ConvPlan], dict[int, str]],
                     draws: Draws) -> list[GemmEntry]:
        """Rewrite the gradients of ``site`` that ``plan`` samples; their report entries."""
        rewrite, reasons = plan
        entries = _conv_entries(site, rewrite, reasons)  # before the rewrite erases nodes
        if rewrite is None:
            return entries
        failed = self._guarded(graph, site.node, draws, functools.partial(self._rewrite_conv, graph, rewrite, draws))
        return entries if failed is None else _conv_entries(site, None, dict.fromkeys(range(len(site.roles)), failed))

    def _plan_conv(self, site: ConvSite) -> tuple[Optional[ConvPlan], dict[int, str]]:
        return plan_adaptive_conv(site, self.config) if self.config.adaptive else plan_conv(site, self.config)

    def _plan(self, site: GemmSite, dependent: set[torch.fx.Node]) -> Union[Rewrite, str]:
        if self.config.adaptive:
            return plan_adaptive(site, self.config)
        if self.config.draws_in_forward:
            return plan_forward_rows(site, self.config, dependent)
        return plan_gemm(site, self.config)

    def _guarded(self, graph: torch.fx.Graph, node: torch.fx.Node, draws: Draws,
                 rewrite: Callable[[], None]) -> Optional[str]:
        """Run ``rewrite``; ``None`` if it succeeds. If it raises, undo what it inserted, tell
        ``on_fallback`` and return why ``node`` stays exact (with ``strict``, raise instead)."""
        # Rewrites insert their nodes just before ``node`` and replace it only once they are built
        # (a forward-rows rewrite first replaces the forward GEMM by an equivalent one: kept).
        start = node.prev
        try:
            rewrite()
        except Exception as exc:
            if self.config.strict:
                raise RewriteError(f"ubcompile could not rewrite {node.format_node()}: {exc}") from exc
            inserted = set()
            while node.prev is not start:
                inserted.add(node.prev)
                graph.erase_node(node.prev)
            for key in [k for k, nodes in draws.items() if inserted.intersection(nodes)]:
                del draws[key]
            reason = f"rewrite failed, kept exact ({type(exc).__name__}: {exc})"
            self.on_fallback(node, reason)
            return reason
        return None

    def _estimate(self, graph: torch.fx.Graph, rewrite: Union[GemmRewrite, ConvRewrite],
                  operands: list[torch.fx.Node], draws: Draws, shared: SharedDraws) -> Any:
        """Insert what computes ``rewrite``'s estimate (before its node) and return its output.

        The first rewrite of a :class:`~.rules.DrawKey` with a diagonal sketch draws inside its
        product's op, from the operands of every product ``shared`` says will read the draw, and
        records the drawn indices and weights; the later ones with that key (the layer's other
        gradient) read them. A projection is drawn by its own op, once per key."""
        node, key = rewrite.site.node, rewrite.draw_key
        if key in draws:
            _check_defined_before(draws[key], node)
            return inline_call(graph, rewrite.estimator(), [*operands, *draws[key]], meta_from=node)
        others = [other for other in shared.get(key, ()) if other is not rewrite]
        drawing = rewrite.drawing_estimator(len(draws))
        if drawing is not None:
            partner_operands = [arg for other in others for arg in other.site.node.args]
            estimate, draws[key] = inline_call(graph, drawing, [*operands, draws.seed, *partner_operands],
                                               meta_from=node)
            return estimate
        draw = SKETCH_TABLE[rewrite.sketch].draw(rewrite, len(draws))
        draws[key] = inline_call(graph, draw, [*operands, draws.seed], meta_from=node)
        return inline_call(graph, rewrite.estimator(), [*operands, *draws[key]], meta_from=node)

    def _rewrite_gemm(self, graph: torch.fx.Graph, rewrite: Rewrite, draws: Draws, shared: SharedDraws) -> None:
        if not isinstance(rewrite, GemmRewrite):  # the families that insert themselves
            rewrite.insert(graph, draws)
            return
        node = rewrite.site.node
        with graph.inserting_before(node):
            sampled = self._estimate(graph, rewrite, list(node.args), draws, shared)
        node.replace_all_uses_with(sampled)
        graph.erase_node(node)

    def _rewrite_conv(self, graph: torch.fx.Graph, rewrite: ConvPlan, draws: Draws) -> None:
        if isinstance(rewrite, AdaptiveConvRewrite):
            rewrite.insert(graph, draws)
            return
        node = rewrite.site.node
        with graph.inserting_before(node):
            estimates = self._estimate(graph, rewrite, list(node.args[:3]), draws, {})
        for output, estimate in zip(rewrite.site.outputs, estimates):
            if estimate is not None:
                output.replace_all_uses_with(estimate)
                graph.erase_node(output)
        narrow_exact(rewrite.site, rewrite.sampled)


SharedDraws = dict[DrawKey, list[GemmRewrite]]
"""The GEMM rewrites that read each norm draw read by more than one, in graph order."""


def _share_draws(plans: list) -> SharedDraws:
    """Group the norm-sketch GEMM rewrites of ``plans`` by draw key; where several share a draw,
    move the operands of the later ones before the first (:func:`~.graph.hoist`), which draws from
    them all. A rewrite whose operands cannot be moved there is planned exact instead (in
    ``plans``): drawn from the first product's norms alone, its estimate would be biased.
    """
    groups: dict[DrawKey, list[int]] = {}
    for i, plan in enumerate(plans):
        if isinstance(plan, GemmRewrite) and plan.sketch == "norm":
            groups.setdefault(plan.draw_key, []).append(i)
    shared: SharedDraws = {}
    for key, (first, *later) in groups.items():
        node = plans[first].site.node
        for i in later:
            if not all(hoist(arg, node) for arg in plans[i].site.node.args):
                plans[i] = f"its operands are computed after the draw it would share with {node.name}; kept exact"
        partners = [plans[i] for i in later if isinstance(plans[i], GemmRewrite)]
        if partners:
            plans[first] = dataclasses.replace(plans[first], shared_dims=tuple(p.op_dim for p in partners))
            shared[key] = [plans[first], *partners]
    return shared


def _check_defined_before(drawn: tuple[torch.fx.Node, ...], user: torch.fx.Node) -> None:
    """Raise unless every node of the shared draw ``drawn`` comes before ``user`` in the graph."""
    late = [node.name for node in drawn if not node < user]
    if late:
        raise RuntimeError(f"the shared draw {', '.join(late)} is defined after its user {user.name}")


def _sampling_fields(rewrite) -> dict:
    return dict(axis=AXIS_NAMES[rewrite.axis], sketch=rewrite.sketch, n=rewrite.n, k=rewrite.k, p=rewrite.p)


def _gemm_entry(node: torch.fx.Node, role: Role, decision) -> GemmEntry:
    """The report line of a GEMM site: sampled by ``decision`` or kept exact for the reason it gives."""
    flops = gemm_flops(node)
    label = f"bmm {role.value}" if node.target is torch.ops.aten.bmm.default else role.value
    common = dict(module=module_path(node), role=label, shape=gemm_dims(node), exact_flops=flops)
    if isinstance(decision, (GemmRewrite, ForwardRowsRewrite)):
        return GemmEntry(**common, sampled_flops=decision.sampled_flops(), **_sampling_fields(decision))
    if isinstance(decision, AdaptiveRewrite):
        return GemmEntry(**common, sampled_flops=flops, axis="rows", sketch="norm", n=decision.n)
    return GemmEntry(**common, sampled_flops=flops, reason=decision)


def _conv_entries(site: ConvSite, rewrite: Optional[ConvPlan], reasons: dict[int, str]) -> list[GemmEntry]:
    entries = []
    for output, role in enumerate(site.roles):
        if role is None:
            continue
        common = dict(module=module_path(site.node), role=f"conv {role.value}", shape=conv_dims(site, output),
                      exact_flops=conv_flops(site, output))
        if output in reasons or rewrite is None:
            entries.append(GemmEntry(**common, sampled_flops=common["exact_flops"], reason=reasons.get(output, "")))
        elif isinstance(rewrite, AdaptiveConvRewrite):
            entries.append(GemmEntry(**common, sampled_flops=common["exact_flops"], axis="rows", sketch="norm", n=rewrite.n))
        else:
            entries.append(GemmEntry(**common, sampled_flops=rewrite.sampled_flops(output), **_sampling_fields(rewrite)))
    return entries


def _exact_entry(unmatched: Unmatched) -> GemmEntry:
    node = unmatched.node
    flops = gemm_flops(node) if node.target in GEMMS else 0
    return GemmEntry(module=module_path(node), role=str(getattr(node.target, "_opname", node.target)),
                     shape=gemm_dims(node) if flops else (), exact_flops=flops, sampled_flops=flops,
                     reason=unmatched.reason)
