"""``p="auto"``: per-layer keep fractions chosen, during training, from measured variance.

Every weight-gradient product ``T = x @ y`` the pass hands to the controller (batch/token rows
contracted, one :class:`AutoSite` per product) runs through :meth:`AutoController.contraction`:

* **measure** (the site's first call, then after 5, 10, 20, ... calls, the gap doubling up to
  ``measure_every``, and after a spike): besides the product at the current fraction, the sketch
  variance at each level of :data:`LEVELS` and the minibatch-SGD variance are estimated
  (:mod:`ubcompile.sketches.control`). They need the terms' norms ``a_j`` (computed anyway),
  each sample's squared norm (free for a plain batch, a small Gram product per sequence with
  tokens), and ``||T||^2``, estimated without bias by ``||T_hat||^2 - V_sketch(k)`` from the
  sampled product itself: a measurement costs no extra GEMM on a plain batch.
* **allocate** (after every measurement): the fractions of all measured sites are chosen together
  (:func:`allocate`) so that their added variances sum to at most ``budget`` times the sum of their
  SGD variances, with the most FLOPs saved: noise goes where it buys the most FLOPs, and a layer
  whose sampling is noisy for little saving stays exact. (The paper's trade-off is in the total
  variance: SGD needs about ``1 + sum V_sketch / sum V_sgd`` times the steps.)
* **sample** (other calls): the norm sketch at the chosen fraction, a dense GEMM of inner size
  ``k``. The norm sketch is the only family used: at the same ``k`` its variance is never above the
  uniform sketch's (:mod:`ubcompile.sketches.norm`).
* **guard**: every call knows ``sum_j a_j^2`` (the squared norms of the product's terms) for free.
  A call where it jumps above :data:`SPIKE` times its running mean (a loss spike) is computed
  exactly and measured, and the site's most aggressive allowed level moves one step towards exact;
  each clean measurement later gives one step back.

The product's output shape never changes, so the compiled graphs stay static: the fraction is
chosen inside one opaque op, among the few :data:`LEVELS`, with no recompilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from tabulate import tabulate
from torch import Tensor

from .sketches import keep_count, sampled_contraction
from .sketches.control import sample_norms_flops, sample_sq_norms, sgd_variance, sketch_variances
from .sketches.norm import contraction_importance, pps_sample

LEVELS = (1.0, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05)
"""The keep fractions a site can use, from exact to the most aggressive."""

SPIKE = 4.0
"""A call whose ``sum_j a_j^2`` exceeds this multiple of its running mean is a spike."""

_SMOOTHING = 0.9  # running mean of sum_j a_j^2: mean <- s * mean + (1 - s) * value
_WARMUP = 50  # calls before the spike guard is armed
_FIRST_GAP = 5  # calls between the first two measurements; the gap then doubles up to measure_every


@dataclasses.dataclass
class Measurement:
    """One measurement of a site: the SGD variance and ``V_sketch / V_sgd`` at each level."""

    call: int
    sgd_variance: float
    grad_sq_norm: float  # ||T||^2 of the exact product, estimated
    variances: tuple[float, ...]  # V_sketch at each level
    p: float  # the fraction the site ran at after it

    @property
    def ratios(self) -> tuple[float, ...]:
        """``V_sketch / V_sgd`` at each level."""
        v_sgd = self.sgd_variance
        return tuple(v / v_sgd if v_sgd > 0 else (0.0 if v == 0 else math.inf) for v in self.variances)


@dataclasses.dataclass
class AutoSite:
    """One weight-gradient product ``(M x n) @ (n x N)`` under control; ``n`` = batch/token rows."""

    module: str
    shape: tuple[int, int, int]
    group: int  # rows per sample (tokens per sequence); 1 for a plain batch
    level: int = 0  # index into LEVELS; exact until first measured
    ceiling: int = len(LEVELS) - 1  # most aggressive level allowed
    calls: int = 0
    due: bool = False  # measure at the next call (after a spike)
    next_measure: int = 0  # call index of the next scheduled measurement
    gap: int = _FIRST_GAP
    running: Optional[float] = None  # running mean of sum_j a_j^2
    uses: list[int] = dataclasses.field(default_factory=lambda: [0] * len(LEVELS))
    measurements: list[Measurement] = dataclasses.field(default_factory=list)
    spikes: list[int] = dataclasses.field(default_factory=list)
    timeline: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (call, p) at each change
    exact_flops: float = 0.0
    spent_flops: float = 0.0

    @property
    def p(self) -> float:
        return LEVELS[self.level]

    def set_level(self, level: int) -> None:
        if not self.timeline or level != self.level:
            self.timeline.append((self.calls - 1, LEVELS[level]))
        self.level = level


def allocate(flops: list[float], variances: list[tuple[float, ...]], ceilings: list[int],
             allowance: float) -> list[int]:
    """Levels for sites with ``flops`` per exact call and sketch variance ``variances[s][level]``
    (increasing with the level) that save the most FLOPs with ``sum_s variances[s][level_s] <= allowance``.

    Greedy on the exchange rate: repeatedly move the site whose next level saves the most FLOPs per
    unit of added variance, among the moves that still fit, up to each site's ceiling. When every
    site's variance grows convexly with the FLOPs it saves, this follows the Lagrangian optimum
    (it may leave part of the allowance unused at the last move); otherwise it is a heuristic.
    """
    levels = [0] * len(flops)
    used = 0.0
    while True:
        moves = []
        for s, level in enumerate(levels):
            if level < ceilings[s]:
                added = variances[s][level + 1] - variances[s][level]
                saved = flops[s] * (LEVELS[level] - LEVELS[level + 1])
                if used + added <= allowance:
                    moves.append((saved / added if added > 0 else math.inf, s, added))
        if not moves:
            return levels
        _, s, added = max(moves)
        levels[s] += 1
        used += added


class AutoController:
    """The per-site state of ``p="auto"`` for one backend; see the module docstring."""

    def __init__(self, budget: float, measure_every: int) -> None:
        self.budget = budget
        self.measure_every = measure_every
        self.sites: list[AutoSite] = []

    def register(self, module: str, shape: tuple[int, int, int], group: int) -> int:
        """A new site for a compiled product; returns its key for the graph's op call."""
        self.sites.append(AutoSite(module, shape, group))
        return len(self.sites) - 1

    def contraction(self, x: Tensor, y: Tensor, key: int, generator: torch.Generator) -> Tensor:
        """An estimate of ``x @ y`` (rows of ``y`` = batch/token rows) at the site's current fraction."""
        site = self.sites[key]
        site.calls += 1
        n = x.shape[1]
        flops = 2.0 * x.shape[0] * n * y.shape[1]
        site.exact_flops += flops
        a = contraction_importance(x, y)
        if self._spiked(site, float(a.double().square().sum())):
            site.spikes.append(site.calls - 1)
            site.ceiling = max(0, site.level - 1)
            site.set_level(0)
            site.due = True
            site.gap = _FIRST_GAP  # re-measure soon after
        site.uses[site.level] += 1
        k = min(n, keep_count(n, site.p))
        site.spent_flops += flops * k / n
        out = x @ y if k == n else sampled_contraction(x, y, *pps_sample(a, k, generator))
        if site.due or site.calls - 1 >= site.next_measure:
            self._measure(site, x, y, a, out)
        return out

    def _spiked(self, site: AutoSite, sq_norm: float) -> bool:
        spiked = site.running is not None and site.calls > _WARMUP and sq_norm > SPIKE * site.running
        site.running = sq_norm if site.running is None else _SMOOTHING * site.running + (1 - _SMOOTHING) * sq_norm
        return spiked

    def _measure(self, site: AutoSite, x: Tensor, y: Tensor, a: Tensor, out: Tensor) -> None:
        (m, n), big_n = x.shape, y.shape[1]
        group = site.group if site.group > 1 and n % site.group == 0 else 1
        sq = a.double().square() if group == 1 else sample_sq_norms(x, y, group)
        site.spent_flops += sample_norms_flops(m, n, big_n, group)
        v_sketch = sketch_variances(a, [keep_count(n, p) for p in LEVELS])
        grad_sq_norm = max(0.0, float(out.double().square().sum()) - v_sketch[site.level])
        v_sgd = sgd_variance(sq, grad_sq_norm)
        if not site.due:
            site.ceiling = min(len(LEVELS) - 1, site.ceiling + 1)
        site.due = False
        site.next_measure = site.calls - 1 + min(site.gap, self.measure_every)
        site.gap *= 2
        measurement = Measurement(site.calls - 1, v_sgd, grad_sq_norm, tuple(v_sketch), site.p)
        site.measurements.append(measurement)
        self._allocate()
        measurement.p = site.p

    def _allocate(self) -> None:
        """Re-choose every measured site's level (see :func:`allocate`) from its last measurement;
        a site without a finite SGD variance (a batch of one sample) stays exact."""
        measured = [s for s in self.sites if s.measurements and math.isfinite(s.measurements[-1].sgd_variance)]
        last = [s.measurements[-1] for s in measured]
        allowance = self.budget * sum(max(0.0, m.sgd_variance) for m in last)
        levels = allocate([2.0 * math.prod(s.shape) for s in measured], [m.variances for m in last],
                          [s.ceiling for s in measured], allowance)
        for site, level in zip(measured, levels):
            site.set_level(level)

    @property
    def exact_flops(self) -> float:
        """GEMM FLOPs the controlled products would have cost exact, over every call so far."""
        return sum(s.exact_flops for s in self.sites)

    @property
    def spent_flops(self) -> float:
        """GEMM FLOPs they cost: each call at ``k / n``, plus the per-sample norms of measurements."""
        return sum(s.spent_flops for s in self.sites)

    def table(self) -> str:
        rows = []
        for s in self.sites:
            calls = max(1, sum(s.uses))
            use = ", ".join(f"{p:g}: {100 * u / calls:.0f}%" for p, u in zip(LEVELS, s.uses) if u)
            last = s.measurements[-1].ratios[s.level] if s.measurements else math.nan
            rows.append([s.module, "x".join(map(str, s.shape)), s.calls, len(s.measurements), use, f"{s.p:g}",
                         f"{last:.3g}", len(s.spikes),
                         f"{s.spent_flops / s.exact_flops:.3f}" if s.exact_flops else "-"])
        headers = ["module", "M x n x N", "calls", "measured", "fraction used (share of calls)", "now",
                   "V_sketch/V_sgd now", "spikes", "FLOPs vs exact"]
        ratio = self.spent_flops / self.exact_flops if self.exact_flops else 1.0
        summary = (f'p="auto": budget {self.budget:g} (sum of V_sketch <= budget * sum of V_sgd), measured every '
                   f"{self.measure_every} calls; levels {', '.join(f'{p:g}' for p in LEVELS)} chosen at run "
                   f"time inside one compiled op (no recompilation); controlled weight-gradient FLOPs "
                   f"{ratio:.3f} of exact")
        return tabulate(rows, headers=headers, disable_numparse=True) + "\n" + summary
