"""The rewrite rules: one row per (grad mode, gradient role), registered in one table.

A row says which axis of the layer's cotangent ``G`` is sampled for that gradient. The estimator
follows from where that axis sits in the GEMM: a contracted axis is column-row sampled
(:func:`~ubcompile.sketches.sampled_contraction`), an output axis has its rows or columns sampled
(:func:`~ubcompile.sketches.sampled_output`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._torch_private import size_hint
from ..config import SamplingConfig
from ..sketches import keep_count, sampled_contraction, sampled_output, uniform_scale
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
    """An accepted rewrite: keep a fraction ``p`` of ``axis`` of the site's cotangent.

    ``n`` and ``k`` are the example sizes (for the report); the inserted nodes compute both from
    the tensors' shapes, so a symbolic (dynamic) size stays symbolic.
    """

    site: GemmSite
    axis: int
    p: float
    n: int
    k: int

    def draw(self, sampler_id: int, key: int) -> Callable[[Tensor], Tensor]:
        """``g -> idx``: the indices kept along this plan's axis of the cotangent ``g``."""
        axis, p = self.axis, self.p

        def draw(g: Tensor) -> Tensor:
            n = g.shape[axis]
            return torch.ops.ubcompile.uniform_indices(g, n, keep_count(n, p), sampler_id, key)

        return draw

    def estimator(self) -> Estimator:
        """``(x, y, idx) -> estimate of x @ y`` for this site's GEMM, weighting kept indices by n / k."""
        if self.axis == self.site.contracted:
            return lambda x, y, idx: sampled_contraction(x, y, idx, uniform_scale(x.shape[1], idx.shape[0]))
        dim = self.site.output_dim(self.axis)

        def estimate(x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
            n = x.shape[0] if dim == 0 else y.shape[1]
            return sampled_output(x, y, idx, uniform_scale(n, idx.shape[0]), dim)

        return estimate


def plan(site: GemmSite, config: SamplingConfig) -> Union[Plan, str]:
    """The rewrite for ``site`` under ``config``, or the reason it stays exact (a rule declines).

    Decisions use example sizes, so a dynamic batch is judged by the size it was compiled for.
    """
    rule: Optional[Rule] = _TABLE.get((config.grad, site.role))
    if rule is None:
        return f"grad={config.grad!r} keeps {site.role.value} exact"
    dims = gemm_dims(site.node)
    if min(dims) < config.min_dim:
        return f"GEMM {'x'.join(map(str, dims))} has a dim below min_dim={config.min_dim}"
    n = size_hint(site.cotangent.meta["val"].shape[rule.axis])
    k = keep_count(n, config.p)
    if k >= n:
        return f"p={config.p} keeps all {n} {AXIS_NAMES[rule.axis]}"
    return Plan(site, rule.axis, config.p, n, k)
