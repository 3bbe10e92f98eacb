"""The rewrite rules: one row per (grad mode, gradient role), registered in one table.

A row says that, under that ``grad`` mode, GEMMs of that role are sampled along the configured
axis of the layer's cotangent ``G``. The estimator follows from where that axis sits in the GEMM:
a contracted axis is sketched inside the product (``x S y``), an output axis outside it
(``S (x y)``). Each sketch family is one row of :data:`SKETCH_TABLE`: how it draws, and its two
estimators from :mod:`ubcompile.sketches`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._torch_private import size_hint
from ..config import SamplingConfig
from ..sketches import keep_count, sampled_contraction, sampled_output, uniform_scale
from ..sketches.lowrank import projected_contraction, projected_output
from ..sketches.norm import contraction_importance
from .matching import FEATURES, ROWS, GemmSite, Role, gemm_dims

AXIS_NAMES = {ROWS: "rows", FEATURES: "features"}
AXIS_BY_NAME = {name: axis for axis, name in AXIS_NAMES.items()}
Draw = Callable[[Tensor, Tensor], tuple[Tensor, ...]]
"""``(x, y) -> sketch tensors``: kept indices and their weights (0-d, or one per index) for the
diagonal sketches, the ``n x k`` projection for the rank-constrained ones."""


RULES: frozenset[tuple[str, Role]] = frozenset({
    ("weight", Role.GRAD_WEIGHT),
    ("input", Role.GRAD_INPUT),
    # The VJP sketch G S, one draw shared by both gradients of the layer.
    ("both", Role.GRAD_INPUT),
    ("both", Role.GRAD_WEIGHT),
})


@dataclasses.dataclass(frozen=True)
class Plan:
    """An accepted rewrite of ``mm(x, y)``: keep a fraction ``p`` of ``axis`` of the site's cotangent.

    ``n`` and ``k`` are the example sizes (for the report); the inserted nodes compute both from
    the tensors' shapes, so a symbolic (dynamic) size stays symbolic.
    """

    site: GemmSite
    axis: int
    p: float
    sketch: str
    n: int
    k: int

    @property
    def out_dim(self) -> Optional[int]:
        """The output dim the sampled axis runs along, or ``None`` when the GEMM contracts it."""
        return None if self.axis == self.site.contracted else self.site.output_dim(self.axis)

    def size(self, x: Tensor, y: Tensor) -> int:
        """Length of the sampled axis, from the operands' shapes."""
        return {None: x.shape[1], 0: x.shape[0], 1: y.shape[1]}[self.out_dim]

    def importance(self, x: Tensor, y: Tensor) -> Tensor:
        """Norm of the part of ``x @ y`` that each index carries (the minimal-variance weights)."""
        if self.out_dim is None:
            return contraction_importance(x, y)
        return torch.linalg.vector_norm(x, dim=1) if self.out_dim == 0 else torch.linalg.vector_norm(y, dim=0)

    def draw(self, sampler_id: int, key: int) -> Draw:
        """``(x, y) -> sketch tensors``: what this plan's sketch draws for one step."""
        return SKETCH_TABLE[self.sketch].draw(self, sampler_id, key)

    def estimator(self) -> Callable[..., Tensor]:
        """``(x, y, *sketch tensors) -> estimate of x @ y``."""
        rule, out_dim = SKETCH_TABLE[self.sketch], self.out_dim
        if out_dim is None:
            return rule.contraction
        return lambda x, y, *sketch: rule.output(x, y, *sketch, out_dim)

    def sampled_flops(self, exact_flops: int) -> int:
        """GEMM FLOPs of the rewritten product (``exact_flops = 2 M K N`` of the original)."""
        m, k_inner, n_out = gemm_dims(self.site.node)
        if SKETCH_TABLE[self.sketch].projects:
            # The three GEMMs through the k-dimensional projection.
            outer = {None: (m, k_inner, n_out), 0: (k_inner, m, n_out), 1: (m, n_out, k_inner)}[self.out_dim]
            a, n, b = outer
            return 2 * self.k * (a * n + n * b + a * b)
        return exact_flops * self.k // self.n


def _uniform_draw(plan: Plan, sampler_id: int, key: int) -> Draw:
    def draw(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        n = plan.size(x, y)
        k = keep_count(n, plan.p)
        anchor = (x, y)[plan.site.cotangent_arg]  # keeps the draw in the backward, after G exists
        return torch.ops.ubcompile.uniform_indices(anchor, n, k, sampler_id, key), x.new_full((), uniform_scale(n, k))

    return draw


def _norm_draw(plan: Plan, sampler_id: int, key: int) -> Draw:
    def draw(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        k = keep_count(plan.size(x, y), plan.p)
        return torch.ops.ubcompile.pps_indices(plan.importance(x, y), k, sampler_id, key)

    return draw


def _projection_draw(plan: Plan, sampler_id: int, key: int) -> Draw:
    def draw(x: Tensor, y: Tensor) -> tuple[Tensor]:
        n = plan.size(x, y)
        anchor = (x, y)[plan.site.cotangent_arg]
        return (torch.ops.ubcompile.projection(anchor, n, keep_count(n, plan.p), plan.sketch, sampler_id, key),)

    return draw


@dataclasses.dataclass(frozen=True)
class SketchRule:
    """How one sketch family draws, and how its draw enters a product."""

    draw: Callable[[Plan, int, int], Draw]
    contraction: Callable[..., Tensor]  # (x, y, *drawn) -> x S y
    output: Callable[..., Tensor]  # (x, y, *drawn, dim) -> S (x y) or (x y) S
    projects: bool = False  # the draw is a dense n x k projection, not indices


SKETCH_TABLE: dict[str, SketchRule] = {
    "uniform": SketchRule(_uniform_draw, sampled_contraction, sampled_output),
    "norm": SketchRule(_norm_draw, sampled_contraction, sampled_output),
    "lowrank": SketchRule(_projection_draw, projected_contraction, projected_output, projects=True),
    "gaussian": SketchRule(_projection_draw, projected_contraction, projected_output, projects=True),
}


def plan(site: GemmSite, config: SamplingConfig) -> Union[Plan, str]:
    """The rewrite for ``site`` under ``config``, or the reason it stays exact (a rule declines).

    Decisions use example sizes, so a dynamic batch is judged by the size it was compiled for.
    """
    if (config.grad, site.role) not in RULES:
        return f"grad={config.grad!r} keeps {site.role.value} exact"
    dims = gemm_dims(site.node)
    if min(dims) < config.min_dim:
        return f"GEMM {'x'.join(map(str, dims))} has a dim below min_dim={config.min_dim}"
    axis = AXIS_BY_NAME[config.axis]
    n = size_hint(site.cotangent.meta["val"].shape[axis])
    k = keep_count(n, config.p)
    if k >= n:
        return f"p={config.p} keeps all {n} {config.axis}"
    accepted = Plan(site, axis, config.p, config.sketch, n, k)
    exact = 2 * dims[0] * dims[1] * dims[2]
    if accepted.sampled_flops(exact) >= exact:
        return f"a rank-{k} {config.sketch} projection costs more than the exact GEMM"
    return accepted
