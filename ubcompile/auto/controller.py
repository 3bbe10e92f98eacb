"""The state of ``p="auto"``: its sites, their measurements and the spike guard (see :mod:`ubcompile.auto`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from .. import draw_kernels
from ..estimator_ops import gemm_importances
from ..readback import Readback
from ..sketches import keep_count
from ..sketches.control import sample_norms_flops, sample_sq_norms, sgd_variance_of_sum, sketch_variance_vector
from ..sketches.residual import basis_flops, coordinate_flops, tracking_flops
from ..sketches.conv import ConvGeometry, conv_vjp, sample_weight_sq_norms
from .execution import (controlled_product, measurement, norm_sketched_call, propagated_call, residual_bases,
                        residual_coordinates, sample_bounds, sampled_conv_weight, term_norms, tracked_residual_bases)
from .policy import (BASES_EVERY, LEVELS, RESIDUAL_RANK, Option, allocate, conv_site_shape, option_times,
                     site_options)
from .table import controller_table

SPIKE = 4.0
"""A call whose ``sum_j a_j^2`` exceeds this multiple of its running mean is a spike."""

_SMOOTHING = 0.9  # running mean of sum_j a_j^2: mean <- s * mean + (1 - s) * value
_WARMUP = 50  # calls before the spike guard is armed
_FIRST_GAP = 5  # calls between the first two measurements; the gap then doubles up to measure_every
NESTING_CHECKS = 5
"""Steps with a propagated draw at which the products below it check that no other row came back,
per graph (:class:`Propagation`): whether rows stay samples is the network's structure, not its data."""


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


SiteId = tuple[int, str, int]
"""What a site is, stable across recompiles: ``(domain, module path, ordinal)``, the ordinal
counting the controlled products of that module in one graph, in graph order."""


@dataclasses.dataclass
class AutoSite:
    """One product ``(M x n) @ (n x N)`` under control: a weight gradient whose ``n`` batch/token rows
    are contracted (``family="gemm"``), or a convolution's whose ``n`` samples are, each ``span``
    rows (its output positions) of the implicit GEMM and ``reads`` elements of ``G`` and ``x``
    (``"conv"``; see :mod:`.policy`).

    ``shape`` and ``group`` are those of its last call (a recompiled graph may change them);
    ``domain`` is the compiled model it belongs to: each domain has a budget of its own. ``device``
    (a device type) picks the fitted cost models that price its options in time and offer only
    those at least ``min_speedup`` times faster than exact (:func:`~.policy.site_options`); without
    them, with ``None`` or with ``min_speedup = 0``, they are priced in FLOPs."""

    module: str
    shape: tuple[int, int, int]
    domain: int = 0
    device: Optional[str] = None
    min_speedup: float = 1.0
    family: str = "gemm"
    span: int = 1
    reads: int = 0  # operand elements a call reads per contracted index (0: a GEMM's M + N)
    group: int = 1  # rows per sample (tokens per sequence); 1 for a plain batch
    options: tuple[Option, ...] = dataclasses.field(init=False)
    costs: tuple[float, ...] = dataclasses.field(init=False)  # GEMM FLOPs of a call with each option, bases amortised
    call_costs: tuple[float, ...] = dataclasses.field(init=False)  # the same without the bases (counted when made)
    savings: tuple[float, ...] = dataclasses.field(init=False)  # what each option saves: microseconds, else FLOPs
    bases: Optional[tuple[Tensor, Tensor]] = dataclasses.field(default=None, repr=False)  # the residual sketch's u, v
    bases_made: int = 0  # the call that made them
    _counts: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False)  # see keep_counts
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
    # the propagated draw's variance at this site: (the Propagation's measurement, V at each of LEVELS)
    propagation_variance: Optional[tuple[int, tuple[float, ...]]] = None
    upstream: Optional[frozenset[int]] = None  # keys of the controlled propagated sites its operands come from

    def __post_init__(self) -> None:
        self.options = site_options(self.shape, self.device, self.min_speedup, self.family, self.span, self.reads)
        self._price(self.shape)
        self.uses = [0] * len(self.options)

    def _price(self, shape: tuple[int, int, int]) -> None:
        self.costs = tuple(o.flops(*shape) for o in self.options)
        self.call_costs = tuple(o.flops(*shape, bases=0) for o in self.options)
        times = (option_times(self.options, shape, self.device, self.family, self.span, self.reads)
                 if self.min_speedup > 0 else None)
        self.savings = tuple(times[0] - t for t in times[1]) if times else tuple(self.costs[0] - c for c in self.costs)

    @property
    def has_residual(self) -> bool:
        return any(o.sketch == "residual" for o in self.options)

    def keep_counts(self, n: int, device: torch.device) -> Tensor:
        """``keep_count(n, p)`` of every one of :data:`LEVELS`, as an int64 tensor on ``device``,
        made once per ``n`` and device (on CUDA copied from pinned memory: no sync)."""
        if self._counts is None or self._counts[0] != (n, device):
            host = torch.tensor([keep_count(n, p) for p in LEVELS])
            if device.type == "cuda":
                host = host.pin_memory()
            self._counts = ((n, device), host, host.to(device, non_blocking=True))
        return self._counts[2]

    def bases_fit(self, x: Tensor, y: Tensor) -> bool:
        """Whether the site has residual-sketch bases for operands of ``x @ y``'s sizes, dtype and device."""
        if self.bases is None:
            return False
        u, v = self.bases
        return u.shape[0] == x.shape[0] and v.shape[0] == y.shape[1] and u.dtype == x.dtype and u.device == x.device

    @property
    def bases_stale(self) -> bool:
        """Whether the bases have served :data:`BASES_EVERY` calls."""
        return self.calls - 1 - self.bases_made >= BASES_EVERY

    def bind(self, shape: tuple[int, int, int], samples: int, span: int = 1, reads: int = 0) -> None:
        """Take the shape, span and reads of this call (its options stay the ones of the first) and the
        rows per sample: ``n / samples`` when the ``n`` contracted rows split evenly into ``samples``."""
        if (shape, span, reads) != (self.shape, self.span, self.reads):
            self.shape, self.span, self.reads = shape, span, reads
            self._price(shape)
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

    def option_at(self, level: int) -> int:
        """The most aggressive of the site's options that keeps at least ``LEVELS[level]``."""
        return max((i for i, o in enumerate(self.options) if o.level <= level), key=lambda i: self.options[i].level)


@dataclasses.dataclass
class Step:
    """One backward pass of a domain so far: the sites it called (a site called again begins the
    next), its first propagated site ``first`` (a key) and that site's graph, and its draw: the keep
    count ``k`` (``None``: exact), or, measuring, the rows' norms ``u`` (that step is its
    :class:`Propagation`'s latest measurement, ``measured``)."""

    seen: set[int] = dataclasses.field(default_factory=set)
    first: Optional[int] = None
    graph: str = ""
    k: Optional[int] = None
    u: Optional[Tensor] = None
    checks: bool = False  # whether the products below the draw run the nesting check

    @property
    def drew(self) -> bool:
        """Whether the first propagated site drew or measured."""
        return self.k is not None or self.u is not None


@dataclasses.dataclass
class Propagation:
    """The controlled propagated gradients ``G W`` of one domain (``grad="both"``): one level for all.

    In a step, the first propagated site (the deepest layer's) keeps ``k`` of the batch's ``n``
    rows, drawn by the rows' norms of its ``G``, weighted ``1 / pi_j``; the other rows' gradient is
    zero. Every earlier layer then sees a cotangent with at most ``k`` nonzero rows, and each later
    propagated site, at the same or a milder level, keeps them all (a norm draw keeps with
    probability 1 when ``k`` covers every nonzero row): one draw, no compounding. A weight gradient
    below the draw whose option would keep more rows keeps those ``k`` alone, exact given the draw,
    at ``k / n`` of its FLOPs (:meth:`AutoController._narrowed`). Its cost is the
    variance it adds to each earlier weight gradient ``sum_j (1 / pi_j - 1) ||t_j||^2``, ``t_j`` that
    site's per-sample term (:func:`~ubcompile.sketches.control.sketch_variance_vector` of the first
    site's row norms and the site's terms' norms), measured at a step whose propagated gradients run
    exact (every weight site after the first propagated one measures then). The allocation prices
    the group as one more site: that variance, summed over the weight sites, against the time (or
    FLOPs) its sites save.

    This holds where rows stay samples down the network: no residual connection carrying the
    undrawn rows, no batch norm or attention mixing them. The **nesting check** watches it: at the
    first :data:`NESTING_CHECKS` steps of each graph that draw, every call below the draw counts its
    nonzero samples on the device, and a count above ``k``, read back later, turns the group exact
    for good, with the reason in ``disabled``."""

    level: int = 0
    first: Optional[int] = None  # key of the site that runs first in a step, as last seen
    calls: int = 0  # steps
    next_measure: int = 0
    gap: int = _FIRST_GAP
    due: bool = False
    measured: int = -1  # the step of the latest measurement
    expected: int = 0  # weight sites that measured its variance at that step
    measurements: int = 0
    disabled: str = ""
    timeline: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, fraction) at each change
    checked: dict[str, int] = dataclasses.field(default_factory=dict)  # per graph: steps whose draw was checked
    # per measurement priced: (its step, the allocation's allowance, each level's added variance in the budget's units)
    prices: list[tuple[int, float, tuple[float, ...]]] = dataclasses.field(default_factory=list)

    def set_level(self, level: int) -> None:
        if level != self.level:
            self.timeline.append((self.calls - 1, LEVELS[level]))
        self.level = level


class AutoController:
    """The per-site state of ``p="auto"`` for one backend; see the module docstring."""

    def __init__(self, budget: float, measure_every: int, budget_scale: str = "layer", min_speedup: float = 1.0) -> None:
        self.budget = budget
        self.budget_scale = budget_scale
        self.min_speedup = min_speedup
        self.measure_every = measure_every
        self.sites: list[AutoSite] = []
        self._keys: dict[SiteId, int] = {}
        self._domain_calls: dict[int, int] = {}
        self.readback = Readback()  # the device statistics on their way to the host
        self._unread: set[int] = set()  # sites that posted statistics since the last collect
        self.propagation: dict[int, Propagation] = {}  # per domain with propagated sites
        self._steps: dict[int, Step] = {}  # per domain

    def register(self, module: str, shape: tuple[int, int, int], domain: int = 0, ordinal: int = 0,
                 device: Optional[str] = None, family: str = "gemm", span: int = 1, reads: int = 0) -> int:
        """The key of the site ``(domain, module, ordinal)`` (see :data:`SiteId`): the existing
        one (a recompiled graph has the same products), else a new one of ``family``, ``shape``,
        ``span`` and ``reads`` (:class:`AutoSite`), on a device of type ``device``. The compiled op registers at
        its call, so a graph served by a compile cache finds its sites too."""
        identity = (domain, module, ordinal)
        key = self._keys.get(identity)
        if key is None:
            key = self._keys[identity] = len(self.sites)
            self.sites.append(AutoSite(module, shape, domain, device, self.min_speedup, family, span, reads))
        return key

    def live(self, site: AutoSite) -> bool:
        """Whether ``site`` is still called: its domain made fewer than two calls per site since its
        last one. A site of a graph no longer run (a layer removed, a branch not taken) retires
        from the allocation until it is called again."""
        return self._domain_calls[site.domain] - site.last_seen < 2 * len(self.sites)

    def _enter(self, key: int) -> tuple[AutoSite, Step]:
        """Begin a call of the site ``key``: act on what was read back since its last one
        (:meth:`collect`; in a step of several sites, once, for all of them, in one read), and
        return the site and its domain's :class:`Step`."""
        if key in self._unread:
            self.collect()
        site = self.sites[key]
        calls = self._domain_calls[site.domain] = self._domain_calls.get(site.domain, 0) + 1
        if site.calls and calls - site.last_seen >= 2 * len(self.sites):
            site.due = True  # back from retirement: its last measurement is old
        site.last_seen = calls
        step = self._steps.get(site.domain)
        if step is None or key in step.seen:
            step = self._steps[site.domain] = Step()
        step.seen.add(key)
        return site, step

    def _count(self, site: AutoSite, shape: tuple[int, int, int], samples: int, span: int = 1,
               reads: int = 0) -> tuple[int, bool]:
        """Count a call of ``site`` on a product of ``shape`` (its ``n`` indices from ``samples``
        samples, each ``span`` rows, ``reads`` elements) at its option; its keep count ``k`` and
        whether its schedule measures it."""
        site.bind(shape, samples, span, reads)
        site.calls += 1
        site.exact_flops += site.costs[0]
        site.uses[site.option] += 1
        site.spent_flops += site.call_costs[site.option]
        n = shape[1]
        return min(n, keep_count(n, site.p)), site.due or site.calls - 1 >= site.next_measure

    def contraction(self, x: Tensor, y: Tensor, key: int, seed: Tensor, stream: int, samples: Optional[int] = None,
                    graph: str = "", upstream: str = "") -> Tensor:
        """``x @ y`` for the site ``key``, sampled with its current option (rows of ``y`` = batch/token
        rows, from ``samples`` samples; ``None``: one row each). Every random number comes from the
        0-d ``seed`` and the draw's ``stream`` (the compiled op passes the product's place in its
        graph); ``graph`` names the op's graph and ``upstream`` the controlled propagated gradients
        its operands are computed from there (:meth:`_below`)."""
        site, step = self._enter(key)
        k, measuring = self._count(site, (x.shape[0], x.shape[1], y.shape[1]), x.shape[1] if samples is None else samples)
        step = self._below(site, step, graph, upstream)
        measuring = measuring or step is not None and step.u is not None
        narrowed = self._narrowed(site, step, k, measuring)
        k = k if narrowed is None else narrowed
        if not measuring and (site.current.sketch == "norm" or narrowed is not None) and k < x.shape[1]:
            out, sq_norm, a = norm_sketched_call(x, y, k, seed, draw_kernels.stream_of(stream, 0))
            self._post_guard(key, site, sq_norm)
            self._check_nesting(key, site, step, a)
            return out
        *norms, a, sq_norm = term_norms(x, y)
        self._check_nesting(key, site, step, a)
        self._post_guard(key, site, sq_norm)
        residual = site.current.sketch == "residual" and narrowed is None and k < x.shape[1]
        split = self._split(site, x, y, norms, seed, stream, fresh=measuring) if residual or (
            measuring and site.has_residual) else None
        out = controlled_product(x, y, k, a, split if residual else None, seed, stream)
        if split is not None and not residual:  # made for the measurement alone
            site.spent_flops += coordinate_flops(*site.shape, RESIDUAL_RANK)
        if measuring:
            (m, n), big_n = x.shape, y.shape[1]
            group = site.group
            # With one row per sample, sum_i ||s_i||^2 is the call's sum_j a_j^2, computed already.
            sq_samples = None if group == 1 else sample_sq_norms(x, y, group)
            sq_sum = sq_norm if group == 1 else sq_samples.sum().reshape(1)
            site.spent_flops += sample_norms_flops(m, n, big_n, group)
            if step is not None and step.u is not None:
                self._post_propagation_variance(key, site, step, a if group == 1 else sq_samples.sqrt())
            r = a if split is None else split[-1]
            self._measure(key, out, sq_sum, torch.stack([a, a, r, r]).reshape(2, 2, n), n // group)
        return out

    def conv_weight(self, g: Tensor, x: Tensor, w: Tensor, geometry: ConvGeometry, key: int, seed: Tensor,
                    stream: int, graph: str = "", upstream: str = "") -> Tensor:
        """The weight gradient of a convolution (cotangent ``g``, input ``x``, weight ``w``) for the
        site ``key``, on the norm sketch of its batch at the site's current fraction: a convolution
        backward on the kept samples, drawn by the bounds ``||G[b]|| ||x[b]||`` from ``seed`` and
        ``stream``. A measurement computes every sample's own weight gradient, at exact's FLOPs,
        for their norms: the sketch's variance is that of the true terms, not of the bounds.

        An exact call that does not measure computes the exact gradient alone: the bounds read all
        of ``G`` and ``x`` (on a CPU core, 4-5 ms for a 128-sample batch at 64-128 channels, a
        tenth of the gradient itself), so the spike guard watches the sampled calls only, and the
        calls below a checked propagated draw, which the nesting check needs them for (:class:`Propagation`)."""
        shape, span, reads = conv_site_shape(g.shape, x.shape, w.shape, geometry.transposed)
        batch = shape[1]
        site, step = self._enter(key)
        k, measuring = self._count(site, shape, batch, span, reads)
        step = self._below(site, step, graph, upstream)
        measuring = measuring or step is not None and step.u is not None
        narrowed = self._narrowed(site, step, k, measuring)
        k = k if narrowed is None else narrowed
        if k < batch or measuring or step is not None and step.checks:
            a, sq_norm = sample_bounds(g, x)
            self._post_guard(key, site, sq_norm)
            self._check_nesting(key, site, step, a)
        if k < batch:
            out = sampled_conv_weight(g, x, w, geometry, k, a, seed, stream)
        else:
            out = conv_vjp(g, x, w, geometry, (False, True))[1]
        if measuring:
            sq_norms = sample_weight_sq_norms(g, x, w, geometry)
            site.spent_flops += site.costs[0]
            norms = sq_norms.sqrt()
            if step is not None and step.u is not None:
                self._post_propagation_variance(key, site, step, norms)
            terms = torch.stack([a, norms.to(a.dtype)]).repeat(2, 1, 1)
            self._measure(key, out.flatten(1), sq_norms.sum().reshape(1), terms, batch)
        return out

    def propagated(self, x: Tensor, y: Tensor, out_dim: int, key: int, seed: Tensor, stream: int, graph: str = "",
                   upstream: str = "") -> Tensor:
        """A propagated gradient ``x @ y`` for the site ``key``, its output rows along ``out_dim`` (a
        plain batch's samples) sampled at its domain's :class:`Propagation` level: the step's first
        propagated site draws (or, measuring, runs exact and keeps its rows' norms for the weight
        sites below it); those below it (:meth:`_below`) keep at least as many rows, which covers
        the nonzero ones, and any other runs exact."""
        site, step = self._enter(key)
        group = self.propagation.setdefault(site.domain, Propagation())
        first = step.first is None
        measuring = False
        if first:
            step.first, step.graph, group.first, group.calls = key, graph, key, group.calls + 1
            measuring = not group.disabled and (group.due or group.calls - 1 >= group.next_measure)
            level = 0 if measuring or group.disabled else group.level
        else:
            below = self._below(site, step, graph, upstream)
            level = group.level if below is not None and below.k is not None else 0
        site.set_option(site.option_at(level))
        n = x.shape[0] if out_dim == 0 else y.shape[1]
        k, _ = self._count(site, (x.shape[1], n, y.shape[1] if out_dim == 0 else x.shape[0]), n)
        if measuring:
            step.u = gemm_importances(x, y, out_dim)
            group.measured, group.expected, group.measurements = group.calls - 1, 0, group.measurements + 1
            group.due = False
            group.next_measure = group.calls - 1 + min(group.gap, self.measure_every)
            group.gap *= 2
        if k >= n:
            return x.mm(y)
        out, nonzero = propagated_call(x, y, out_dim, k, seed, draw_kernels.stream_of(stream, 0))
        if first:
            step.k = k
            step.checks = group.checked.get(graph, 0) < NESTING_CHECKS
            group.checked[graph] = group.checked.get(graph, 0) + step.checks
        elif step.checks:
            self._post_nesting(key, nonzero, step.k)
        return out

    def _below(self, site: AutoSite, step: Step, graph: str, upstream: str) -> Optional[Step]:
        """``step`` if this call of ``site`` (an op of ``graph``, computed from the controlled
        propagated gradients ``upstream``: their sites, ``"ordinal:module"``) gets its first
        propagated site's draw or measurement, else ``None``. A call after such a draw in another
        graph (a graph break) could get it unseen: that turns the domain's propagated gradients exact."""
        if not step.drew:
            return None
        if graph != step.graph:
            self._disable(site.domain, f"{site.module} ran after a propagated draw of another graph (a graph break): "
                                       "ubcompile cannot see whether its gradient gets the draw")
            return None
        if site.upstream is None:
            names = (name.split(":", 1) for name in upstream.split("/") if name)
            site.upstream = frozenset(self._keys.get((site.domain, module, int(ordinal)), -1) for ordinal, module in names)
        return step if step.first in site.upstream else None

    def _narrowed(self, site: AutoSite, step: Optional[Step], k: int, measuring: bool) -> Optional[int]:
        """The keep count of a call below a propagated draw that kept fewer samples' rows than the
        call would (``None`` otherwise): at most that many rows are nonzero (the nesting check
        watches it), and the norm sketch keeps each of them with probability 1 at that count, so the
        call is exact given the draw, at the drawn rows' FLOPs (counted here)."""
        if step is None or step.k is None or measuring:
            return None
        rows = step.k * site.group
        if rows >= k:
            return None
        m, _, big_n = site.shape
        site.spent_flops += 2.0 * m * rows * big_n - site.call_costs[site.option]
        return rows

    def _disable(self, domain: int, reason: str) -> None:
        """Turn the domain's propagated gradients exact for good, for ``reason``."""
        group = self.propagation[domain]
        if not group.disabled:
            group.disabled = reason
            group.set_level(0)

    def _check_nesting(self, key: int, site: AutoSite, step: Optional[Step], a: Tensor) -> None:
        """Below a propagated draw of this step, post how many of the site's samples have a nonzero
        term (``a``: the terms' norms, a convolution's per-sample bounds) for the nesting check."""
        if step is None or step.k is None or not step.checks:
            return
        per_sample = a if site.group == 1 else a.reshape(-1, site.group).sum(1)
        self._post_nesting(key, (per_sample > 0).sum().reshape(1), step.k)

    def _post_nesting(self, key: int, nonzero: Tensor, k: int) -> None:
        self.readback.post(nonzero, ("nesting", key, self.sites[key].calls - 1, k))
        self._unread.add(key)

    def _post_propagation_variance(self, key: int, site: AutoSite, step: Step, norms: Tensor) -> None:
        """At a step whose first propagated site measured (its rows' norms ``step.u``), post the
        variance its draw would add to this site's product at each of :data:`LEVELS`, from the
        norms of the site's per-sample terms (:class:`Propagation`); a site with another number of
        samples than the drawn rows fails the nesting check instead."""
        group = self.propagation[site.domain]
        if norms.shape[0] != step.u.shape[0]:
            self._post_nesting(key, norms.new_full((1,), step.u.shape[0] + 1), step.u.shape[0])
            return
        counts = self.sites[group.first].keep_counts(step.u.shape[0], norms.device)
        self.readback.post(sketch_variance_vector(step.u, counts, norms), ("propagation", key, group.measured))
        self._unread.add(key)
        group.expected += 1

    def _post_guard(self, key: int, site: AutoSite, sq_norm: Tensor) -> None:
        """Send this call's ``sum_j a_j^2`` to the spike guard (:meth:`_guard`), read from a later call."""
        self.readback.post(sq_norm, ("guard", key, site.calls - 1))
        self._unread.add(key)

    def _split(self, site: AutoSite, x: Tensor, y: Tensor, norms: list[Tensor], seed: Tensor, stream: int,
               fresh: bool) -> tuple[Tensor, ...]:
        """The residual split of this call (``u``, ``v``, ``xu``, ``yv`` and the residual terms'
        norms) on the site's bases. They are made anew from random probes when ``fresh`` (a
        measurement) or when none fit ``x`` and ``y``, and tracked (one power iteration from the
        last ones, :func:`~ubcompile.sketches.residual.tracked_bases`) once they have served
        :data:`BASES_EVERY` calls."""
        if fresh or not site.bases_fit(x, y):
            site.bases = residual_bases(x, y, seed, draw_kernels.stream_of(stream, 1))
            site.bases_made = site.calls - 1
            site.spent_flops += basis_flops(*site.shape, RESIDUAL_RANK)
        elif site.bases_stale:
            site.bases = tracked_residual_bases(x, y, *site.bases)
            site.bases_made = site.calls - 1
            site.spent_flops += tracking_flops(*site.shape, RESIDUAL_RANK)
        return (*site.bases, *residual_coordinates(x, y, *site.bases, *norms))

    def collect(self, wait: bool = False) -> None:
        """Act on the statistics read back since the last call (spike checks, measurements); with
        ``wait``, on all of them, waiting for their copies (for a report)."""
        self._unread.clear()
        for (what, key, call, *rest), values in (self.readback.drain() if wait else self.readback.collect()):
            site = self.sites[key]
            if what == "guard":
                self._guard(site, call, float(values[0]))
            elif what == "nesting":
                self._nesting(site, float(values[0]), *rest)
            elif what == "propagation":
                site.propagation_variance = (call, tuple(values.tolist()))
            else:
                self._record(site, call, values, *rest)

    def _nesting(self, site: AutoSite, nonzero: float, k: int) -> None:
        """The nesting check (:class:`Propagation`): more nonzero samples than the draw kept turns
        the domain's propagated gradients exact for good."""
        if nonzero > k:
            self._disable(site.domain, f"{site.module} had {nonzero:.0f} nonzero samples below a propagated draw that "
                                       f"kept {k}: the rows do not stay samples down the network (a residual connection, "
                                       "batch norm or attention), so the draw's variance is not the one priced")

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
            group = self.propagation.get(site.domain)
            if group is not None:
                group.set_level(0)
                group.due, group.gap = True, _FIRST_GAP

    def _measure(self, key: int, out: Tensor, sq_sum: Tensor, terms: Tensor, samples: int) -> None:
        """Post this call's statistics (``sum_i ||s_i||^2`` of its ``samples`` samples, ``||T_hat||^2``,
        each option's ``V_sketch`` from ``terms``: see :func:`~.execution.measurement`) for
        :meth:`_record`, and schedule the next measurement."""
        site = self.sites[key]
        stats = measurement(out, sq_sum, site.keep_counts(terms.shape[-1], out.device), terms)
        self.readback.post(stats, ("measure", key, site.calls - 1, samples, site.option))
        if not site.due:
            site.ceiling = min(len(LEVELS) - 1, site.ceiling + 1)
        site.due = False
        site.next_measure = site.calls - 1 + min(site.gap, self.measure_every)
        site.gap *= 2

    def _record(self, site: AutoSite, call: int, values, samples: int, option: int) -> None:
        """A measurement read back: ``||T||^2`` estimated without bias by ``||T_hat||^2 - V_sketch``
        of the option ``call`` ran at, the SGD variance of its ``samples`` samples; then allocate."""
        sq_sum, out_sq, *per_level = values.tolist()
        sketches = ("norm", "residual")
        variances = [per_level[sketches.index(o.sketch) * len(LEVELS) + o.level] for o in site.options]
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
        units = [self._unit(m) for m in last]
        allowance = self.budget * sum(u * max(0.0, m.sgd_variance) for u, m in zip(units, last))
        allowed = [[i for i, o in enumerate(s.options) if o.level <= s.ceiling] for s in measured]
        points = [[(s.savings[i], u * m.variances[i]) for i in keep]
                  for s, m, u, keep in zip(measured, last, units, allowed)]
        group = self._priced_propagation(domain, measured, units)
        if group is not None:
            points.append(group[1])
            prices = self.propagation[domain].prices
            if not prices or prices[-1][0] != self.propagation[domain].measured:
                prices.append((self.propagation[domain].measured, allowance, tuple(v for _, v in group[1])))
        choices = allocate(points, allowance)
        if group is not None:
            self.propagation[domain].set_level(group[0][choices.pop()])
        for site, keep, choice in zip(measured, allowed, choices):
            site.set_option(keep[choice])

    def _priced_propagation(self, domain: int, measured: list[AutoSite],
                            units: list[float]) -> Optional[tuple[list[int], list[tuple[float, float]]]]:
        """The domain's :class:`Propagation` as one more site of the allocation: its levels and each
        one's ``(saved, variance)``, the variance its draw adds to the measured weight sites, each
        in its unit; ``None`` while it cannot be priced (disabled, not measured, a weight site's
        variance not yet read back, or no weight site after it: its noise would reach only the input)."""
        group = self.propagation.get(domain)
        if group is None or group.disabled or group.first is None or group.expected == 0:
            return None
        priced = [(u, s.propagation_variance[1]) for s, u in zip(measured, units)
                  if s.propagation_variance is not None and s.propagation_variance[0] == group.measured]
        if len(priced) < group.expected:
            return None
        members = [s for s in self.sites if s.domain == domain and s.family == "propagated" and self.live(s)]
        levels = sorted({o.level for o in self.sites[group.first].options})
        return levels, [(sum(s.savings[s.option_at(level)] for s in members),
                         sum(u * v[level] for u, v in priced)) for level in levels]

    def _unit(self, measurement: Measurement) -> float:
        """The weight of a site's variances in the budget: 1 (``budget_scale="global"``), or one over
        its gradient's squared norm ``||T||^2`` (``"layer"``: each layer's noise relative to its own
        gradient, as an optimizer that normalises each parameter's update sees it; 0 for a zero gradient)."""
        if self.budget_scale == "global":
            return 1.0
        return 1.0 / measurement.grad_sq_norm if measurement.grad_sq_norm > 0 else 0.0

    @property
    def exact_flops(self) -> float:
        """GEMM FLOPs the controlled products would have cost exact, over every call so far."""
        return sum(s.exact_flops for s in self.sites)

    @property
    def spent_flops(self) -> float:
        """GEMM FLOPs they cost: each call at ``k / n``, plus the per-sample norms of measurements."""
        return sum(s.spent_flops for s in self.sites)

    def table(self) -> str:
        """The per-site table and summary of the report (every statistic read back first)."""
        self.collect(wait=True)
        return controller_table(self)
