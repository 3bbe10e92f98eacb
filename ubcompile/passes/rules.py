"""The rewrite rules every family shares: one table of (grad mode, gradient role), one of sketches.

A row of :data:`RULES` says that, under that ``grad`` mode, gradients of that role are sampled
along the configured axis of the layer's cotangent ``G``. :func:`decline` applies the table and
the policy (``filter``, ``min_dim``, ``p``, ``min_speedup``) and gives the reason when a gradient
stays exact.
Each sketch family is one row of :data:`SKETCH_TABLE`: how it draws from the operands of the node
being rewritten. A diagonal sketch is drawn inside the op that computes the rewritten product
(each family's ``drawing_estimator``); a projection is its own op, for which the family supplies
the sampled axis's size, the device anchor and the :class:`DrawKey` its draw is shared by through
the :class:`Sampled` protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Protocol, Union

import torch
import torch.fx
from torch import Tensor

from ..auto import site_options
from ..config import SamplingConfig
from ..cost_model import model_for, predicted_speedup
from ..sketches import keep_count
from .graph import FEATURES, ROWS, Role

AXIS_NAMES = {ROWS: "rows", FEATURES: "features"}
AXIS_BY_NAME = {name: axis for axis, name in AXIS_NAMES.items()}

RULES: frozenset[tuple[str, Role]] = frozenset({
    ("weight", Role.GRAD_WEIGHT),
    ("input", Role.GRAD_INPUT),
    # The VJP sketch G S, one draw shared by both gradients of the layer.
    ("both", Role.GRAD_INPUT),
    ("both", Role.GRAD_WEIGHT),
})


class DrawKey(NamedTuple):
    """What a draw on a cotangent draws: rewrites with equal keys share one draw.

    ``dim`` counts from the front: the families name ``G``'s axes differently (a GEMM's rows and
    features are its last two dims, a convolution's batch and channels its first two)."""

    cotangent: torch.fx.Node
    dim: int
    n: int  # the length of ``dim``, at its example value
    strata: int
    sketch: str


def site_name(module: str, ordinal: int) -> str:
    """A controlled op's site as an op argument names it: ``"ordinal:module"`` (a module path has no ``/``)."""
    return f"{ordinal}:{module}"


class Draws(dict[Union[torch.fx.Node, DrawKey], tuple[torch.fx.Node, ...]]):
    """The draws a pass inserted so far: per :class:`DrawKey`, or per activation for draws in the
    forward, and the graph's inputs they come from: ``seed``, its seed, and under ``p="auto"``
    ``handle``, which names the backend's stream for the controlled ops (:mod:`.seed_input`).
    ``controlled`` lists the module of each controlled op inserted, in order, and ``propagated``
    maps each controlled propagated gradient's op to its site's name (:func:`site_name`)."""

    def __init__(self, seed: torch.fx.Node, handle: Optional[torch.fx.Node] = None) -> None:
        super().__init__()
        self.seed = seed
        self.handle = handle
        self.controlled: list[str] = []
        self.propagated: dict[torch.fx.Node, str] = {}

    @property
    def graph_id(self) -> str:
        """What the graph's controlled ops pass to say which graph they are in: the name of its
        first controlled op's site (:func:`site_name`; site names are unique in a compiled
        model). Empty before the first is placed."""
        return site_name(self.controlled[0], 0) if self.controlled else ""


Draw = Callable[..., tuple[Tensor, ...]]
"""``(*operands, seed) -> (omega,)``: the ``n x k`` projection of a rank-constrained sketch; every
random number comes from the 0-d ``seed`` and the draw's key (:mod:`ubcompile.draw_ops`)."""


class Sampled(Protocol):
    """What a draw needs from the rewrite it serves; methods take the rewritten node's operands."""

    p: float
    sketch: str
    strata: int  # the draw keeps the same number of indices in each of this many equal blocks
    draw_key: DrawKey

    def size(self, *operands: Tensor) -> int:
        """Length ``n`` of the sampled axis."""

    def anchor(self, *operands: Tensor) -> Tensor:
        """The cotangent: fixes the draw's device and orders it after the cotangent exists."""


class Product(NamedTuple):
    """A (implicit) GEMM's sizes as the cost rule sees them (:mod:`ubcompile.cost_model`): the device
    type, the op family (``"gemm"``, ``"conv"``), the sampled dim's length ``s``, the other two dims
    ``x`` and ``y``, the number of products of a ``bmm``, the rows of ``s`` each sampled index
    spans (a convolution's sample: its positions), and the operand elements the sampled op reads
    (``None``: a GEMM's; a convolution's batch: ``|G| + |x|``), at their example values."""

    device: str
    op: str
    s: int
    x: int
    y: int
    batch: int = 1
    span: int = 1
    elements: Optional[int] = None


def sample_size(n: int, p: float, strata: int = 1) -> int:
    """``k``: ``keep_count`` of each of ``strata`` equal blocks of the ``n`` indices, summed."""
    return strata * keep_count(n // strata, p)


def _projection_draw(rewrite: Sampled, key: int) -> Draw:
    def draw(*operands: Tensor) -> tuple[Tensor]:
        *operands, seed = operands
        n = rewrite.size(*operands)
        k = keep_count(n, rewrite.p)
        return (torch.ops.ubcompile.projection(rewrite.anchor(*operands), n, k, rewrite.sketch, seed, key),)

    return draw


@dataclasses.dataclass(frozen=True)
class SketchRule:
    """How one sketch family draws: ``draw`` is ``None`` for a diagonal sketch, whose indices and
    weights the rewritten product's own op draws (``sampled_gemm``, ``sampled_conv_backward``)."""

    draw: Optional[Callable[[Sampled, int], Draw]]  # (rewrite, the draw's key in its graph) -> Draw

    @property
    def projects(self) -> bool:
        """The draw is a dense ``n x k`` projection, not indices and weights."""
        return self.draw is not None


SKETCH_TABLE: dict[str, SketchRule] = {
    "uniform": SketchRule(None),
    "norm": SketchRule(None),
    "lowrank": SketchRule(_projection_draw),
    "gaussian": SketchRule(_projection_draw),
}


def _filtered(config: SamplingConfig, module: str) -> Optional[str]:
    return f"filter excludes module {module!r}" if config.filter is not None and not config.filter(module) else None


def _too_small(config: SamplingConfig, span: int) -> Optional[str]:
    return f"its sampled axis spans {span} rows/columns of the GEMM, below min_dim={config.min_dim}" if span < config.min_dim else None


def _too_slow(config: SamplingConfig, product: Product, strata: int) -> Optional[str]:
    """Why sampling ``product`` would not pay on its device, by the device's cost model. Under
    ``p="auto"`` a product is left to the controller if it has any option besides exact
    (:func:`ubcompile.auto.policy.site_options`, which offers only those predicted to pay)."""
    if config.min_speedup == 0:
        return None
    if config.adaptive:
        n = product.s // product.span
        shape, reads = (product.x, n, product.y * product.span), (product.elements or 0) // n
        if len(site_options(shape, product.device, config.min_speedup, product.op, product.span, reads)) > 1:
            return None
        return (f"no fraction of p='auto' is predicted {config.min_speedup:g}x faster than the exact {product.op} on "
                f"{product.device} (ubcompile.cost_model)")
    model = model_for(product.device, product.op, config.sketch)
    if model is None:
        return None
    k = sample_size(product.s, config.p, strata)
    speedup = predicted_speedup(model, product.s, k, product.x, product.y, product.batch, product.elements)
    if speedup >= config.min_speedup:
        return None
    return (f"sampled, it would take {1 / speedup:.1f}x the exact {product.op}'s time on {product.device} "
            f"(ubcompile.cost_model), below min_speedup={config.min_speedup:g}")


def excluded(config: SamplingConfig, module: str, span: int) -> Optional[str]:
    """Why the user's policy keeps a product of ``module`` exact: ``filter``, or ``min_dim`` on
    ``span``, the sampled axis's length in rows of the (implicit) GEMM; ``None`` if it allows it."""
    return _filtered(config, module) or _too_small(config, span)


def decline(config: SamplingConfig, role: Role, module: str, n: int, strata: int = 1,
            span: Optional[int] = None, product: Optional[Product] = None) -> Optional[str]:
    """Why a gradient of ``role`` in ``module`` stays exact under ``config``, or ``None`` to sample it.

    ``n`` is the length of the axis to sample (drawn in ``strata`` equal blocks) and ``span`` its
    length in rows of the gradient's (implicit) GEMM, ``n`` unless one index spans several (a
    convolution's sample spans its positions), at their example values: a dynamic batch is judged
    by its compiled size. ``min_dim`` tests ``span`` alone: the other dims of the GEMM are not sampled.
    ``product``, where given, is judged by the cost rule (``min_speedup``).
    """
    not_in_mode = f"grad={config.grad!r} keeps {role.value} exact" if (config.grad, role) not in RULES else None
    reason = _filtered(config, module) or not_in_mode or _too_small(config, n if span is None else span)
    if reason is not None:
        return reason
    if not config.adaptive and sample_size(n, config.p, strata) >= n:
        per_block = f" ({n // strata} in each of {strata} groups)" if strata > 1 else ""
        return f"p={config.p} keeps all {n} {config.axis}{per_block}"
    return _too_slow(config, product, strata) if product is not None else None
