"""The joint-graph pass: replace recognised gradient GEMMs by sampled, smaller GEMMs."""

from __future__ import annotations

import functools
import hashlib
import pathlib
from typing import Callable

import torch
import torch.fx

from .._torch_private import CustomGraphPass
from ..config import SamplingConfig
from ..report import GemmEntry, GraphReport
from .flops import gemm_flops
from .inline import inline_call
from .matching import GemmSite, backward_gemms, gemm_dims
from .rules import AXIS_NAMES, Plan, plan


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """Hash of every source file of the package: any code change invalidates compiled graphs."""
    root = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def module_path(node: torch.fx.Node) -> str:
    """The innermost forward module of a backward node, e.g. ``layers.2`` (``?`` if unknown)."""
    stack = node.meta.get("fwd_nn_module_stack") or node.meta.get("nn_module_stack")
    if not stack:
        return "?"
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['fn'].", "L['self']", "L['fn']"):
        if path.startswith(prefix):
            return path[len(prefix):] or "<root>"
    return path


class JointSamplingPass(CustomGraphPass):
    """Rewrites an AOTAutograd joint graph in place and reports what it did to ``on_report``."""

    def __init__(self, config: SamplingConfig, sampler_id: int,
                 on_report: Callable[[GraphReport], None]) -> None:
        self.config = config
        self.sampler_id = sampler_id
        self.on_report = on_report

    def uuid(self) -> str:
        return f"ubcompile-{self.config!r}-sampler{self.sampler_id}-{_source_hash()}"

    def __call__(self, graph: torch.fx.Graph) -> None:
        sites, unmatched = backward_gemms(graph)
        entries = [self._exact_entry(u.node, "", u.reason) for u in unmatched]
        draws: dict[tuple[torch.fx.Node, int], tuple[torch.fx.Node, ...]] = {}
        for site in sites:
            decision = plan(site, self.config)
            if isinstance(decision, Plan):
                entries.append(self._rewrite(graph, decision, draws))
            else:
                entries.append(self._exact_entry(site.node, site.role.value, decision))
        graph.lint()
        self.on_report(GraphReport(entries, joint_code=graph.python_code("self").src))

    def _rewrite(self, graph: torch.fx.Graph, decision: Plan,
                 draws: dict[tuple[torch.fx.Node, int], tuple[torch.fx.Node, ...]]) -> GemmEntry:
        site: GemmSite = decision.site
        entry = GemmEntry(
            module=module_path(site.node), role=site.role.value, shape=gemm_dims(site.node),
            exact_flops=gemm_flops(site.node), sampled_flops=decision.sampled_flops(gemm_flops(site.node)),
            axis=AXIS_NAMES[decision.axis], sketch=decision.sketch, n=decision.n, k=decision.k, p=decision.p,
        )
        x, y = site.node.args
        with graph.inserting_before(site.node):
            key = (site.cotangent, decision.axis)
            if key not in draws:  # one draw per cotangent axis: a layer's two gradients share it
                draw = decision.draw(self.sampler_id, len(draws))
                draws[key] = inline_call(graph, draw, [x, y], meta_from=site.node)
            sampled = inline_call(graph, decision.estimator(), [x, y, *draws[key]], meta_from=site.node)
        site.node.replace_all_uses_with(sampled)
        graph.erase_node(site.node)
        return entry

    @staticmethod
    def _exact_entry(node: torch.fx.Node, role: str, reason: str) -> GemmEntry:
        flops = gemm_flops(node)
        return GemmEntry(module=module_path(node), role=role or str(node.target), shape=_dims_or_empty(node),
                         exact_flops=flops, sampled_flops=flops, reason=reason)


def _dims_or_empty(node: torch.fx.Node) -> tuple:
    return gemm_dims(node) if node.target is torch.ops.aten.mm.default else ()
