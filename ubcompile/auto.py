"""``p="auto"``: per-layer sketches and keep fractions chosen, during training, from measured variance.

Every weight-gradient product ``T = x @ y`` the pass hands to the controller (batch/token rows
contracted, one :class:`AutoSite` per product) runs through :meth:`AutoController.contraction`,
with one of the site's :class:`Option` s: exact, the norm sketch keeping a fraction ``p`` of the
rows (:mod:`ubcompile.sketches.norm`), or the residual sketch, which computes a rank-``2 r`` part
of ``T`` exactly and applies the norm sketch to the rest (:mod:`ubcompile.sketches.residual`;
costlier per kept row, much less noisy where the batch's rows lie near a low-dimensional subspace).

* **measure** (the site's first call, then after 5, 10, 20, ... calls, the gap doubling up to
  ``measure_every``, and after a spike): besides the product, the sketch variance of every option
  and the minibatch-SGD variance are estimated (:mod:`ubcompile.sketches.control`). They need the
  terms' norms ``a_j`` (computed anyway), the residual terms' norms (from the residual sketch's
  bases: a few thin GEMMs when the site is not using it already), each sample's squared norm
  (free for a plain batch, a small Gram product per sequence with tokens), and ``||T||^2``,
  estimated without bias by ``||T_hat||^2 - V_sketch`` from the sampled product itself.
* **allocate** (after every measurement): the options of all measured sites are chosen together
  (:func:`allocate`) so that their added variances sum to at most ``budget`` times the sum of their
  SGD variances, with the most FLOPs saved (each option's FLOPs counted in full, bases included):
  noise goes where it buys the most FLOPs, and a layer whose sampling is noisy for little saving
  stays exact. (The paper's trade-off is in the total variance: SGD needs about
  ``1 + sum V_sketch / sum V_sgd`` times the steps.) The uniform sketch is never an option: at the
  same ``k`` the norm sketch's variance is never above it.
* **sample** (other calls): the chosen option, dense GEMMs of inner size ``k`` (``2 r + k``).
* **propagated gradients** ``G W`` (``kind="rows"``) are never sampled (their noise would reach
  every earlier layer): they are computed exactly. (Computing them on ``G``'s nonzero rows only,
  where a class-token readout leaves the others zero, took a ``nonzero()`` per call: a host sync.)
* **guard**: every call knows ``sum_j a_j^2`` (the squared norms of the product's terms) for free.
  When it jumps above :data:`SPIKE` times its running mean (a loss spike), the site's next calls
  are computed exactly and it is measured again, and its most aggressive allowed fraction moves
  one level towards exact; each clean measurement later gives one level back.

**No host sync.** The statistics stay on the device; the controller reads them back asynchronously
(:class:`~ubcompile.readback.Readback`) and acts on them at a later call: a measurement's
allocation, and a spike's fallback, apply from the next call on (the spiking call itself is
sampled as chosen before it). Each call's option still depends only on earlier calls, so every
gradient stays unbiased.

The product's output shape never changes, so the compiled graphs stay static: the option is
chosen inside one opaque op, among the few :data:`LEVELS` of each sketch, with no recompilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from tabulate import tabulate
from torch import Tensor

from . import draw_kernels
from .estimator_ops import CONTRACTED, sketched_product_kernel
from .kernels import kernel
from .readback import Readback
from .sketches import keep_count
from .sketches.control import sample_norms_flops, sample_sq_norms, sgd_variance_of_sum, sketch_variance_vector
from .sketches.counter_rng import normal
from .sketches.norm import factor_norms
from .sketches.residual import ResidualSplit, residual_contraction, residual_flops, split_flops

LEVELS = (1.0, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05)
"""The keep fractions a site can use, from exact to the most aggressive."""

RESIDUAL_RANK = 8
"""Rank ``r`` of each basis of the residual sketch (:mod:`ubcompile.sketches.residual`)."""

SPIKE = 4.0
"""A call whose ``sum_j a_j^2`` exceeds this multiple of its running mean is a spike."""

_SMOOTHING = 0.9  # running mean of sum_j a_j^2: mean <- s * mean + (1 - s) * value
_WARMUP = 50  # calls before the spike guard is armed
_FIRST_GAP = 5  # calls between the first two measurements; the gap then doubles up to measure_every


@kernel
def term_norms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``||x[:, j]||``, ``||y[j, :]||``, the terms' norms ``a_j`` (their products) and ``sum_j a_j^2``
    (float64): what every call of a site needs, in one compiled kernel."""
    x_norms, y_norms = factor_norms(x, y)
    a = x_norms * y_norms
    return x_norms, y_norms, a, a.double().square().sum()


@kernel
def residual_split(x: Tensor, y: Tensor, x_norms: Tensor, y_norms: Tensor, seed: Tensor,
                   key: int) -> tuple[Tensor, ...]:
    """The tensors of the rank-:data:`RESIDUAL_RANK` :class:`~.sketches.residual.ResidualSplit`
    of ``x @ y``, from Gaussian probes of the counter generator, and its residual terms' norms."""
    probes = normal(seed, key, 2 * x.shape[1] * RESIDUAL_RANK).reshape(2, x.shape[1], RESIDUAL_RANK)
    split = ResidualSplit.from_probes(x, y, probes[0], probes[1])
    return split.u, split.v, split.xu, split.yv, split.importance(x_norms, y_norms)


@kernel
def residual_product(x: Tensor, y: Tensor, u: Tensor, v: Tensor, xu: Tensor, yv: Tensor, idx: Tensor,
                     weights: Tensor) -> Tensor:
    """:func:`~.sketches.residual.residual_contraction` on the split's tensors, compiled."""
    return residual_contraction(x, y, ResidualSplit(u, v, xu, yv), idx, weights)


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

    def flops(self, m: int, n: int, big_n: int) -> float:
        """GEMM FLOPs of one call on ``(m x n) @ (n x N)``."""
        k = min(n, keep_count(n, self.p))
        if k == n:
            return 2.0 * m * n * big_n
        if self.sketch == "norm":
            return 2.0 * m * k * big_n
        return float(residual_flops(m, n, big_n, RESIDUAL_RANK, k))


def site_options(shape: tuple[int, int, int]) -> tuple[Option, ...]:
    """Exact, the norm sketch at every level, and the residual sketch at the levels where it costs
    less than exact, if its cheapest level costs less than the mildest norm sketch (half the rows):
    elsewhere (few features against many rows) its bases cost about what they could save, and
    measuring it would cost more than it ever returns."""
    m, n, big_n = shape
    options = [Option("norm", level) for level in range(len(LEVELS))]
    if 2 * RESIDUAL_RANK >= min(m, big_n):
        return tuple(options)
    residual = [Option("residual", level) for level in range(1, len(LEVELS))]
    if residual[-1].flops(*shape) >= options[1].flops(*shape):
        return tuple(options)
    return tuple(options + [o for o in residual if o.flops(*shape) < options[0].flops(*shape)])


@dataclasses.dataclass
class Measurement:
    """One measurement of a site: the SGD variance and the sketch variance of each of its options."""

    call: int
    sgd_variance: float
    grad_sq_norm: float  # ||T||^2 of the exact product, estimated
    variances: tuple[float, ...]  # V_sketch of each option of the site
    option: str  # the label of the option the site ran at after it

    def ratio(self, option: int) -> float:
        """``V_sketch / V_sgd`` of one option."""
        v, v_sgd = self.variances[option], self.sgd_variance
        return v / v_sgd if v_sgd > 0 else (0.0 if v == 0 else math.inf)


SiteId = tuple[int, str, str, int]
"""What a site is, stable across recompiles: ``(domain, module path, kind, ordinal)``, the ordinal
counting the products of that module and kind in one graph, in graph order."""


@dataclasses.dataclass
class AutoSite:
    """One product ``(M x n) @ (n x N)`` under control: a weight gradient whose ``n`` batch/token rows
    are contracted (``kind="sample"``), or a propagated gradient whose ``M`` rows are ``G``'s (``"rows"``).

    ``shape`` and ``group`` are those of its last call (a recompiled graph may change them);
    ``domain`` is the compiled model it belongs to: each domain has a budget of its own."""

    module: str
    shape: tuple[int, int, int]
    kind: str = "sample"  # "rows": a propagated gradient G W, computed exactly
    domain: int = 0
    group: int = 1  # rows per sample (tokens per sequence); 1 for a plain batch
    options: tuple[Option, ...] = dataclasses.field(init=False)
    costs: tuple[float, ...] = dataclasses.field(init=False)  # GEMM FLOPs of one call with each option
    last_seen: int = 0  # the domain's call count at this site's last call
    option: int = 0  # index into options; exact until first measured
    ceiling: int = len(LEVELS) - 1  # most aggressive level allowed
    calls: int = 0
    due: bool = False  # measure at the next call (after a spike)
    next_measure: int = 0  # call index of the next scheduled measurement
    gap: int = _FIRST_GAP
    running: Optional[float] = None  # running mean of sum_j a_j^2
    uses: list[int] = dataclasses.field(init=False)  # calls at each option
    measurements: list[Measurement] = dataclasses.field(default_factory=list)
    spikes: list[int] = dataclasses.field(default_factory=list)
    timeline: list[tuple[int, float, str]] = dataclasses.field(default_factory=list)  # (call, p, sketch) at each change
    exact_flops: float = 0.0
    spent_flops: float = 0.0

    def __post_init__(self) -> None:
        self.options = site_options(self.shape) if self.kind == "sample" else (Option("norm", 0),)
        self.costs = tuple(o.flops(*self.shape) for o in self.options)
        self.uses = [0] * len(self.options)

    def bind(self, shape: tuple[int, int, int], samples: int) -> None:
        """Take the shape of this call (its options stay the ones of the first) and the rows per
        sample: ``n / samples`` when the ``n`` contracted rows split evenly into ``samples``."""
        if shape != self.shape:
            self.shape = shape
            self.costs = tuple(o.flops(*shape) for o in self.options)
        n = shape[1]
        self.group = n // samples if 0 < samples < n and n % samples == 0 else 1

    @property
    def current(self) -> Option:
        return self.options[self.option]

    @property
    def p(self) -> float:
        return self.current.p

    def set_option(self, option: int) -> None:
        if not self.timeline or option != self.option:
            self.timeline.append((self.calls - 1, self.options[option].p, self.options[option].sketch))
        self.option = option


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


class AutoController:
    """The per-site state of ``p="auto"`` for one backend; see the module docstring."""

    def __init__(self, budget: float, measure_every: int) -> None:
        self.budget = budget
        self.measure_every = measure_every
        self.sites: list[AutoSite] = []
        self._keys: dict[SiteId, int] = {}
        self._registered: dict[tuple[int, int, str, str], int] = {}  # (domain, graph, module, kind) -> count
        self._domain_calls: dict[int, int] = {}
        self.readback = Readback()  # the device statistics on their way to the host

    def register(self, module: str, shape: tuple[int, int, int], kind: str = "sample", domain: int = 0,
                 graph: int = 0) -> int:
        """The key of the site a compiled product of ``graph`` is (see :data:`SiteId`): an existing
        site when a recompiled graph has the same product, else a new one."""
        slot = (domain, graph, module, kind)
        ordinal = self._registered.get(slot, 0)
        self._registered[slot] = ordinal + 1
        identity = (domain, module, kind, ordinal)
        if identity not in self._keys:
            self._keys[identity] = len(self.sites)
            self.sites.append(AutoSite(module, shape, kind, domain))
        return self._keys[identity]

    def live(self, site: AutoSite) -> bool:
        """Whether ``site`` is still called: its domain made fewer than two calls per site since its
        last one. A site of a graph no longer run (a layer removed, a branch not taken) retires
        from the allocation until it is called again."""
        return self._domain_calls[site.domain] - site.last_seen < 2 * len(self.sites)

    def contraction(self, x: Tensor, y: Tensor, key: int, generator: torch.Generator,
                    samples: Optional[int] = None) -> Tensor:
        """``x @ y`` for the site ``key``: sampled with its current option (``kind="sample"``: rows of
        ``y`` = batch/token rows, from ``samples`` samples; ``None``: one row each), or exactly
        (``kind="rows"``)."""
        self.collect()
        site = self.sites[key]
        calls = self._domain_calls[site.domain] = self._domain_calls.get(site.domain, 0) + 1
        if site.calls and calls - site.last_seen >= 2 * len(self.sites):
            site.due = True  # back from retirement: its last measurement is old
        site.last_seen = calls
        site.bind((x.shape[0], x.shape[1], y.shape[1]), x.shape[1] if samples is None else samples)
        site.calls += 1
        site.exact_flops += site.costs[0]
        if site.kind == "rows":
            site.uses[0] += 1
            site.spent_flops += site.costs[0]
            return x @ y
        *norms, a, sq_norm = term_norms(x, y)
        self.readback.post(sq_norm, ("guard", key, site.calls - 1))
        site.uses[site.option] += 1
        site.spent_flops += site.costs[site.option]
        k = min(x.shape[1], keep_count(x.shape[1], site.p))
        seed = torch.randint(0, 2**62, (), generator=generator, device=x.device)
        split = residual_split(x, y, *norms, seed, draw_kernels.stream_of(key, 1)) if site.current.sketch == "residual" else None
        if k == x.shape[1]:
            out = x @ y
        else:
            idx, weights = draw_kernels.pps(a if split is None else split[-1], k, seed, draw_kernels.stream_of(key, 0))
            if split is None:
                out = sketched_product_kernel(x, y, idx, weights, CONTRACTED)
            else:
                out = residual_product(x, y, *split[:-1], idx, weights)
        if site.due or site.calls - 1 >= site.next_measure:
            self._measure(key, x, y, norms, split, out, seed)
        return out

    def collect(self, wait: bool = False) -> None:
        """Act on the statistics read back since the last call (spike checks, measurements); with
        ``wait``, on all of them, waiting for their copies (for a report)."""
        for (what, key, call, *rest), values in (self.readback.drain() if wait else self.readback.collect()):
            site = self.sites[key]
            if what == "guard":
                self._guard(site, call, float(values[0]))
            else:
                self._record(site, call, values, *rest)

    def _guard(self, site: AutoSite, call: int, sq_norm: float) -> None:
        """The spike guard on call ``call``'s ``sum_j a_j^2``: a spike sends the site to exact, due
        for a measurement, one level further from its most aggressive fraction."""
        spiked = site.running is not None and call >= _WARMUP and sq_norm > SPIKE * site.running
        site.running = sq_norm if site.running is None else _SMOOTHING * site.running + (1 - _SMOOTHING) * sq_norm
        if spiked:
            site.spikes.append(call)
            site.ceiling = max(0, site.current.level - 1)
            site.set_option(0)
            site.due = True
            site.gap = _FIRST_GAP  # re-measure soon after

    def _measure(self, key: int, x: Tensor, y: Tensor, norms: tuple[Tensor, Tensor],
                 split: Optional[tuple[Tensor, ...]], out: Tensor, seed: Tensor) -> None:
        """Post this call's statistics (``sum_i ||s_i||^2``, ``||T_hat||^2``, each option's
        ``V_sketch``) for :meth:`_record`, and schedule the next measurement."""
        site = self.sites[key]
        (m, n), big_n = x.shape, y.shape[1]
        a = norms[0] * norms[1]
        group = site.group
        sq = a.double().square() if group == 1 else sample_sq_norms(x, y, group)
        site.spent_flops += sample_norms_flops(m, n, big_n, group)
        importances = {"norm": a}
        if any(o.sketch == "residual" for o in site.options):
            if split is None:
                split = residual_split(x, y, *norms, seed, draw_kernels.stream_of(key, 1))
                site.spent_flops += split_flops(m, n, big_n, RESIDUAL_RANK)
            importances["residual"] = split[-1]
        per_level = {sketch: sketch_variance_vector(importance, [keep_count(n, p) for p in LEVELS])
                     for sketch, importance in importances.items()}
        v_sketch = torch.stack([per_level[o.sketch][o.level] for o in site.options])
        stats = torch.cat([sq.sum().reshape(1), out.double().square().sum().reshape(1), v_sketch])
        self.readback.post(stats, ("measure", key, site.calls - 1, sq.shape[0], site.option))
        if not site.due:
            site.ceiling = min(len(LEVELS) - 1, site.ceiling + 1)
        site.due = False
        site.next_measure = site.calls - 1 + min(site.gap, self.measure_every)
        site.gap *= 2

    def _record(self, site: AutoSite, call: int, values, samples: int, option: int) -> None:
        """A measurement read back: ``||T||^2`` estimated without bias by ``||T_hat||^2 - V_sketch``
        of the option ``call`` ran at, the SGD variance of its ``samples`` samples; then allocate."""
        sq_sum, out_sq, *variances = (float(v) for v in values)
        grad_sq_norm = max(0.0, out_sq - variances[option])
        v_sgd = sgd_variance_of_sum(sq_sum, samples, grad_sq_norm)
        measurement = Measurement(call, v_sgd, grad_sq_norm, tuple(variances), site.current.label)
        site.measurements.append(measurement)
        self._allocate(site.domain)
        measurement.option = site.current.label

    def _allocate(self, domain: int) -> None:
        """Re-choose the option of every measured live site of ``domain`` (see :func:`allocate`)
        from its last measurement, among the options at or below its ceiling; a site without a
        finite SGD variance (a batch of one sample) stays exact."""
        measured = [s for s in self.sites if s.domain == domain and self.live(s) and s.measurements
                    and math.isfinite(s.measurements[-1].sgd_variance)]
        last = [s.measurements[-1] for s in measured]
        allowance = self.budget * sum(max(0.0, m.sgd_variance) for m in last)
        allowed = [[i for i, o in enumerate(s.options) if o.level <= s.ceiling] for s in measured]
        points = [[(s.costs[0] - s.costs[i], m.variances[i]) for i in keep] for s, m, keep in zip(measured, last, allowed)]
        for site, keep, choice in zip(measured, allowed, allocate(points, allowance)):
            site.set_option(keep[choice])

    @property
    def exact_flops(self) -> float:
        """GEMM FLOPs the controlled products would have cost exact, over every call so far."""
        return sum(s.exact_flops for s in self.sites)

    @property
    def spent_flops(self) -> float:
        """GEMM FLOPs they cost: each call at ``k / n``, plus the per-sample norms of measurements."""
        return sum(s.spent_flops for s in self.sites)

    def table(self) -> str:
        self.collect(wait=True)
        rows = []
        for s in self.sites:
            calls = max(1, sum(s.uses))
            use = ", ".join(f"{o.label}: {100 * u / calls:.0f}%" for o, u in zip(s.options, s.uses) if u)
            if s.kind == "rows":
                use = "exact (a propagated gradient)"
            last = s.measurements[-1].ratio(s.option) if s.measurements else math.nan
            rows.append([s.module, "x".join(map(str, s.shape)), s.calls, len(s.measurements), use, s.current.label,
                         f"{last:.3g}", len(s.spikes),
                         f"{s.spent_flops / s.exact_flops:.3f}" if s.exact_flops else "-"])
        headers = ["module", "M x n x N", "calls", "measured", "option used (share of calls)", "now",
                   "V_sketch/V_sgd now", "spikes", "FLOPs vs exact"]
        ratio = self.spent_flops / self.exact_flops if self.exact_flops else 1.0
        summary = (f'p="auto": budget {self.budget:g} (sum of V_sketch <= budget * sum of V_sgd), measured every '
                   f"{self.measure_every} calls; the norm sketch at fractions {', '.join(f'{p:g}' for p in LEVELS[1:])}, "
                   f"or with a rank-{RESIDUAL_RANK} part exact (+r{RESIDUAL_RANK}), chosen at run time inside "
                   f"one compiled op (no recompilation); controlled weight-gradient FLOPs "
                   f"{ratio:.3f} of exact")
        return tabulate(rows, headers=headers, disable_numparse=True) + "\n" + summary
