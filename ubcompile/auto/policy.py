"""What a ``p="auto"`` site may run and how the budget is spread: the options (exact, the norm
sketch at each of :data:`LEVELS`, the residual sketch where it can pay) and :func:`allocate`.

A site's ``shape`` is ``(M, n, N)``: its product is ``(M x n) @ (n x N)`` summed over the ``n``
contracted indices (a GEMM's batch/token rows; a convolution's samples, with ``N`` the input
channels, kernel taps and output positions of one, the terms of its implicit GEMM)."""

from __future__ import annotations

import dataclasses
import math

from typing import Optional, Sequence

from ..cost_model import model_for
from ..sketches import keep_count
from ..sketches.conv import implicit_gemm_sizes
from ..sketches.residual import basis_flops, residual_flops, tracking_flops

LEVELS = (1.0, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05)
"""The keep fractions a site can use, from exact to the most aggressive."""

RESIDUAL_RANK = 8
"""Rank ``r`` of each basis of the residual sketch (:mod:`ubcompile.sketches.residual`)."""

BASES_EVERY = 5
"""Calls a site's residual-sketch bases serve before they are tracked to the call's data (one power
iteration from them: :func:`~ubcompile.sketches.residual.tracked_bases`); every measurement makes
them anew from random probes. On the experiments' MLP (docs/experiments/residual.md) bases made 1-5
steps earlier leave the residual variance at 1.1-2.7x that with the step's own (10-25 steps: up to
22x early in training), and bases tracked every 5 steps at 0.62-1.13x (medians 0.79-0.94) that of
fresh ones on the same batch, for a fifth of the QRs and of tracking's FLOPs."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to compute a site's product: exact (``level == 0``) or ``sketch`` keeping ``LEVELS[level]``."""

    sketch: str  # "norm" or "residual"
    level: int

    @property
    def p(self) -> float:
        return LEVELS[self.level]

    @property
    def label(self) -> str:
        if self.level == 0:
            return "exact"
        return f"{self.p:g}" if self.sketch == "norm" else f"{self.p:g}+r{RESIDUAL_RANK}"

    def flops(self, m: int, n: int, big_n: int, bases: float = 1 / BASES_EVERY) -> float:
        """GEMM FLOPs of one call on ``(m x n) @ (n x N)``, with ``bases`` times the residual
        sketch's bases tracking (by default its share of a call: they serve :data:`BASES_EVERY`;
        the fresh bases of a measurement are the measurement's cost)."""
        k = min(n, keep_count(n, self.p))
        if k == n:
            return 2.0 * m * n * big_n
        if self.sketch == "norm":
            return 2.0 * m * k * big_n
        made = basis_flops(m, n, big_n, RESIDUAL_RANK)  # counted in residual_flops: replaced by tracking's share
        return residual_flops(m, n, big_n, RESIDUAL_RANK, k) - made + tracking_flops(m, n, big_n, RESIDUAL_RANK) * bases


FAMILIES = {"gemm": "auto", "conv": "auto_conv", "propagated": "auto"}
"""A site's family (a GEMM's batch/token rows, a convolution's samples, a propagated gradient's
output rows): the op family of :mod:`ubcompile.cost_model` that prices its calls in time, each a
model of the controlled call. A propagated gradient borrows the weight gradient's: the same reads
(``G``'s rows, the kept rows of the other operand's product), GEMMs of ``k / n`` of the work."""


def conv_site_shape(g: Sequence[int], x: Sequence[int], w: Sequence[int],
                    transposed: bool) -> tuple[tuple[int, int, int], int, int]:
    """The ``shape``, ``span`` and ``reads`` of a convolution's weight-gradient site, from the shapes
    of ``G``, ``x`` and ``w``: ``(C_out, batch, positions * per_channel)``, the positions
    (:func:`~ubcompile.sketches.conv.implicit_gemm_sizes`) and the elements of ``G`` and ``x`` per sample."""
    batch, channels, positions, per_channel = implicit_gemm_sizes(g, x, w, transposed)
    return (channels, batch, positions * per_channel), positions, math.prod(g[1:]) + math.prod(x[1:])


def flop_options(shape: tuple[int, int, int], family: str = "gemm") -> tuple[Option, ...]:
    """Exact, the norm sketch at every level, and (for a GEMM) the residual sketch at the levels
    where it costs less than exact, if its cheapest level costs less than the mildest norm sketch
    (half the rows) with its bases made fresh at every refresh, as a measurement makes them:
    elsewhere (few features against many rows) its bases cost about what they could save, and
    measuring it would cost more than it ever returns. A convolution's terms are not rank one:
    the residual sketch's split does not apply."""
    m, n, big_n = shape
    options = [Option("norm", level) for level in range(len(LEVELS))]
    if family != "gemm" or 2 * RESIDUAL_RANK >= min(m, big_n):
        return tuple(options)
    residual = [Option("residual", level) for level in range(1, len(LEVELS))]
    fresh = (basis_flops(*shape, RESIDUAL_RANK) - tracking_flops(*shape, RESIDUAL_RANK)) / BASES_EVERY
    if residual[-1].flops(*shape) + fresh >= options[1].flops(*shape):
        return tuple(options)
    return tuple(options + [o for o in residual if o.flops(*shape) < options[0].flops(*shape)])


def option_times(options: tuple[Option, ...], shape: tuple[int, int, int], device: Optional[str],
                 family: str = "gemm", span: int = 1, reads: int = 0) -> Optional[tuple[float, tuple[float, ...]]]:
    """The exact product's time and each option's call's, in microseconds, on ``device`` (a device
    type), by the fitted cost models of the site's family (:data:`FAMILIES`,
    :mod:`ubcompile.cost_model`); ``None`` without a device or where a model is missing. Each of the
    ``n`` contracted indices spans ``span`` rows of the implicit GEMM (a convolution's sample, its
    positions), whose ``big_n`` columns are ``span`` times those of one row, and the call reads
    ``reads`` operand elements per index (``0``: the GEMM's ``M + N``)."""
    models = {sketch: model_for(device, FAMILIES[family], sketch) for sketch in {o.sketch for o in options}}
    if device is None or None in models.values():
        return None
    m, n, big_n = shape
    rows, columns, elements = n * span, big_n // span, (n * reads if reads else None)
    exact = models["norm"].exact_us(rows, m, columns, elements=elements)
    return exact, tuple(exact if o.level == 0 else
                        models[o.sketch].sampled_us(rows, min(n, keep_count(n, o.p)) * span, m, columns,
                                                    elements=elements)
                        for o in options)


def site_options(shape: tuple[int, int, int], device: Optional[str] = None, min_speedup: float = 1.0,
                 family: str = "gemm", span: int = 1, reads: int = 0) -> tuple[Option, ...]:
    """The options of a site (:func:`flop_options`), less those its device's fitted cost models
    (:func:`option_times`) predict less than ``min_speedup`` times faster than the exact product
    (the cost rule; ``min_speedup = 0`` keeps them all): on a CPU at width 256 the residual
    sketch's extra passes over the operands cost more time than its FLOPs save."""
    options = flop_options(shape, family)
    times = option_times(options, shape, device, family, span, reads) if min_speedup > 0 else None
    if times is None:
        return options
    exact, each = times
    return tuple(o for o, t in zip(options, each) if o.level == 0 or exact >= min_speedup * t)


def lower_hull(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of ``(saved, variance)`` points, from ``points[0] = (0, 0)``
    (exact) to the most saving: the options worth using, in order of increasing saving."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    hull: list[int] = []
    for i in order:
        if hull and points[i][0] == points[hull[-1]][0]:
            continue  # the same saving at a higher variance
        while len(hull) >= 2:
            (x0, y0), (x1, y1), (x2, y2) = points[hull[-2]], points[hull[-1]], points[i]
            if (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0) > 0:  # hull[-1] lies below the chord: keep it
                break
            hull.pop()
        hull.append(i)
    return hull


def allocate(options: list[list[tuple[float, float]]], allowance: float) -> list[int]:
    """The option of each site that saves the most FLOPs with the sum of their variances at most ``allowance``.

    ``options[s]`` lists site ``s``'s options as ``(FLOPs saved per call, V_sketch)``, exact first at
    ``(0, 0)``. Greedy on the exchange rate along each site's lower convex hull
    (:func:`lower_hull`): repeatedly take the hull step, among those that still fit, that saves
    the most FLOPs per unit of added variance. This is the Lagrangian optimum when the hull steps
    fit exactly, and within one hull step of it otherwise.
    """
    hulls = [lower_hull(points) for points in options]
    position = [0] * len(options)
    used = 0.0
    while True:
        moves = []
        for s, hull in enumerate(hulls):
            if position[s] + 1 < len(hull):
                (saved0, var0), (saved1, var1) = options[s][hull[position[s]]], options[s][hull[position[s] + 1]]
                added = var1 - var0
                if used + added <= allowance:
                    moves.append(((saved1 - saved0) / added if added > 0 else math.inf, s, added))
        if not moves:
            return [hull[i] for hull, i in zip(hulls, position)]
        _, s, added = max(moves)
        position[s] += 1
        used += added
