"""The rewrite rules: one row per (grad mode, gradient role), registered in one table.

A row says that, under that ``grad`` mode, GEMMs of that role are sampled along the configured
axis of the layer's cotangent ``G``. The estimator follows from where that axis sits in the GEMM:
a contracted axis is column-row sampled (:func:`~ubcompile.sketches.sampled_contraction`), an
output axis has its rows or columns sampled (:func:`~ubcompile.sketches.sampled_output`). The
sketch (how indices and weights are drawn) is one of :data:`DRAWS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._torch_private import size_hint
from ..config import SamplingConfig
from ..sketches import keep_count, sampled_contraction, sampled_output, uniform_scale
from ..sketches.norm import contraction_importance
from .matching import FEATURES, ROWS, GemmSite, Role, gemm_dims

AXIS_NAMES = {ROWS: "rows", FEATURES: "features"}
AXIS_BY_NAME = {name: axis for axis, name in AXIS_NAMES.items()}
Draw = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(x, y) -> (idx, weights)``: kept indices and their weights (0-d, or one per index)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    grad: str  # the SamplingConfig.grad mode this row belongs to
    role: Role


RULES: tuple[Rule, ...] = (
    Rule("weight", Role.GRAD_WEIGHT),
    Rule("input", Role.GRAD_INPUT),
    # The VJP sketch G S, one draw shared by both gradients of the layer.
    Rule("both", Role.GRAD_INPUT),
    Rule("both", Role.GRAD_WEIGHT),
)
_TABLE: dict[tuple[str, Role], Rule] = {}
for _rule in RULES:
    _TABLE[(_rule.grad, _rule.role)] = _rule


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
        """``(x, y) -> (idx, weights)``: the kept indices and their weights, by this plan's sketch."""
        return DRAWS[self.sketch](self, sampler_id, key)

    def estimator(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """``(x, y, idx, weights) -> estimate of x @ y``."""
        out_dim = self.out_dim
        if out_dim is None:
            return sampled_contraction
        return lambda x, y, idx, weights: sampled_output(x, y, idx, weights, out_dim)


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


DRAWS: dict[str, Callable[[Plan, int, int], Draw]] = {"uniform": _uniform_draw, "norm": _norm_draw}


def plan(site: GemmSite, config: SamplingConfig) -> Union[Plan, str]:
    """The rewrite for ``site`` under ``config``, or the reason it stays exact (a rule declines).

    Decisions use example sizes, so a dynamic batch is judged by the size it was compiled for.
    """
    if (config.grad, site.role) not in _TABLE:
        return f"grad={config.grad!r} keeps {site.role.value} exact"
    dims = gemm_dims(site.node)
    if min(dims) < config.min_dim:
        return f"GEMM {'x'.join(map(str, dims))} has a dim below min_dim={config.min_dim}"
    axis = AXIS_BY_NAME[config.axis]
    n = size_hint(site.cotangent.meta["val"].shape[axis])
    k = keep_count(n, config.p)
    if k >= n:
        return f"p={config.p} keeps all {n} {config.axis}"
    return Plan(site, axis, config.p, config.sketch, n, k)
