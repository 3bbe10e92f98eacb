"""The rewrite rules: one row per (grad mode, gradient role), registered in one table.

A row says which axis of the layer's cotangent ``G`` is sampled for that gradient. The estimator
follows from where that axis sits in the GEMM: a contracted axis is column-row sampled
(:func:`~ubcompile.sketches.sampled_contraction`), an output axis has its rows or columns sampled
(:func:`~ubcompile.sketches.sampled_output`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Union

from torch import Tensor

from ..config import SamplingConfig
from ..sketches import keep_count, sampled_contraction, sampled_output
from .matching import FEATURES, ROWS, GemmSite, Role, gemm_dims

AXIS_NAMES = {ROWS: "rows", FEATURES: "features"}
Estimator = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Rule:
    grad: str  # the SamplingConfig.grad mode this row belongs to
    role: Role
    axis: int  # the axis of G that is sampled: ROWS or FEATURES


RULES: tuple[Rule, ...] = (
    # Column-row sampling of the weight gradient over batch/token rows; grad_input stays exact.
    Rule("weight", Role.GRAD_WEIGHT, ROWS),
    # The VJP sketch G S over output features, shared by both gradients of the layer.
    Rule("both", Role.GRAD_INPUT, FEATURES),
    Rule("both", Role.GRAD_WEIGHT, FEATURES),
)
_TABLE: dict[tuple[str, Role], Rule] = {}
for _rule in RULES:
    _TABLE[(_rule.grad, _rule.role)] = _rule


@dataclasses.dataclass(frozen=True)
class Plan:
    """An accepted rewrite: keep ``k`` of the ``n`` entries of ``axis`` of the site's cotangent."""

    site: GemmSite
    axis: int
    n: int
    k: int

    @property
    def scale(self) -> float:
        return self.n / self.k

    def estimator(self) -> Estimator:
        """``(x, y, idx) -> estimate of x @ y`` for this site's GEMM."""
        if self.axis == self.site.contracted:
            return functools.partial(sampled_contraction, scale=self.scale)
        return functools.partial(sampled_output, scale=self.scale, dim=self.site.output_dim(self.axis))


def plan(site: GemmSite, config: SamplingConfig) -> Union[Plan, str]:
    """The rewrite for ``site`` under ``config``, or the reason it stays exact (a rule declines)."""
    rule: Optional[Rule] = _TABLE.get((config.grad, site.role))
    if rule is None:
        return f"grad={config.grad!r} keeps {site.role.value} exact"
    dims = gemm_dims(site.node)
    if not all(isinstance(d, int) for d in dims):
        return f"symbolic GEMM size {dims}: mark the dimension static to sample it"
    if min(dims) < config.min_dim:
        return f"GEMM {'x'.join(map(str, dims))} has a dim below min_dim={config.min_dim}"
    n = int(site.cotangent.meta["val"].shape[rule.axis])
    k = keep_count(n, config.p)
    if k >= n:
        return f"p={config.p} keeps all {n} {AXIS_NAMES[rule.axis]}"
    return Plan(site, rule.axis, n, k)
