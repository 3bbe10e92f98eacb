"""The sampling configuration: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional, Union

COMPILERS = ("inductor", "eager")
"""What compiles the rewritten graphs: Inductor, or nothing (``aot_eager``-style, for reference)."""

GRAD_MODES = ("weight", "input", "both")
"""Which gradient GEMMs of a linear layer ``y = x W^T`` (cotangent ``G``) are sampled.

``"weight"``: the weight gradient ``G^T x`` only; propagated gradients stay exact, so no noise
compounds down the network. ``"input"``: the propagated gradient ``G W`` only. ``"both"``: both,
from one shared draw: the paper's VJP sketch ``G S`` feeding the whole layer's backward.
"""

AXES = ("rows", "features")
"""Which axis of the cotangent ``G`` (``rows x features``) the sketch samples: batch/token rows, or
output features. A GEMM that contracts the axis has its inner dimension shrunk (column-row
sampling); one that does not has only the kept rows/columns of its output computed."""

DEFAULT_AXIS = {"weight": "rows", "input": "features", "both": "features"}

SKETCHES = ("uniform", "norm", "lowrank", "gaussian", "activation")
"""``"uniform"``: ``k`` indices uniformly without replacement, weight ``n / k``. ``"norm"``: the
minimal-variance probabilities ``pi_j = min(1, c a_j)`` from the norms of the GEMM's terms, a
fixed-size systematic sample, weights ``1 / pi_j`` (see :mod:`ubcompile.sketches.norm`).
``"lowrank"`` / ``"gaussian"``: a rank-``k`` random projection ``S = Omega Omega^T`` with
orthonormal (scaled) or Gaussian ``Omega`` (see :mod:`ubcompile.sketches.lowrank`); used only
where the three thinner GEMMs cost less than the exact one. ``"activation"``: saves memory; the
probabilities ``pi_j = min(1, c ||A_j||)`` come from the norms of the layer input's rows alone,
so the layer's forward GEMM draws them and only the ``k`` kept rows of ``A`` are saved for the
backward (see :mod:`ubcompile.passes.forward_rows`); linear layers' weight gradients only."""


BUDGET_SCALES = ("global", "layer")
"""How ``p="auto"`` sums the layers' variances against its budget (see :class:`SamplingConfig`)."""


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Options of the ubcompile backend.

    Attributes:
        p: keep fraction in (0, 1]. Each sampled GEMM keeps ``k = ceil(p * n)`` of the ``n``
            entries of its sampled axis. ``p = 1`` compiles exact gradients. ``"auto"`` chooses
            each weight-gradient GEMM's sketch (the norm sketch, or the residual sketch with a
            low-rank part exact) and fraction during training from measured variance
            (:mod:`ubcompile.auto`); it needs rows and the norm sketch, and ``grad="weight"`` or
            ``"both"`` (which also hands it the propagated gradients over a plain batch's rows,
            sampled nested: see :mod:`ubcompile.auto`).
        budget: with ``p="auto"``, the sketch's added variance allowed, summed over the sampled
            layers, as a fraction of their summed minibatch-SGD variance (0.1: the smallest budget
            that cut the backward FLOPs by 40% on both experiment models, docs/EXPERIMENTS.md).
        budget_scale: with ``p="auto"``, how the layers' variances are summed against the budget.
            ``"layer"`` (default): each over its own layer's squared gradient norm, so that every
            layer's noise counts relative to its own gradient (what an optimizer that normalises
            each parameter's update, such as Adam, sees: a small layer's noise is not small after
            it). ``"global"``: as they are, the squared error of the whole gradient (what an SGD
            step sees). Measured (docs/EXPERIMENTS.md, 2026-12-04): on the Adam-trained char-GPT
            ``"global"`` loses 0.56 point at width 64 and 4-10 points at width 256, ``"layer"``
            stays within 0.5; on the SGD-trained MLP and ViT both do.
        strict: raise when a rewrite fails, instead of keeping that gradient exact with a warning.
        sample_in_eval: sample gradients in ``eval()`` mode too. By default only a module in
            training mode is sampled; gradients taken in ``eval()`` mode (saliency maps,
            attributions) are exact.
        measure_every: with ``p="auto"``, a layer's variances are measured at least every this many
            steps (more often at the start of training, when they change fastest).
        grad: which gradient GEMMs are sampled, one of :data:`GRAD_MODES`.
        sketch: how the kept indices are drawn, one of :data:`SKETCHES`.
        axis: the sampled axis of the cotangent, one of :data:`AXES`; ``None`` takes
            :data:`DEFAULT_AXIS` of ``grad`` (rows for ``"weight"``, features otherwise; rows under ``p="auto"``).
        seed: seed of the backend's own random generator; ``None`` derives it from
            ``torch.initial_seed()`` at the first draw, so ``torch.manual_seed`` reproduces runs.
        min_dim: minimum-size rule. A gradient is sampled only if its sampled axis spans at least
            ``min_dim`` rows of its (implicit) GEMM: a feature or channel counts one, a
            convolution's sample one per output position. Under ``axis="features"`` a 10-way
            classifier head stays exact (its few kept features would not pay for the gathers); the
            dims not sampled do not count.
        min_speedup: cost rule. A GEMM or convolution gradient is sampled only if its device's cost
            model (:mod:`ubcompile.cost_model`, fitted to ``benchmarks/break_even.py``'s timings)
            predicts the sampled op at least this many times faster than the exact one; under
            ``p="auto"``, at the controller's lowest fraction, and the controller then offers each
            site only the options predicted that much faster, priced in time
            (:func:`ubcompile.auto.policy.site_options`; with ``0``, every option, priced in FLOPs). The default 1.0 keeps exact every
            product sampling would slow down: on a CPU, a GEMM whose two unsampled dims are narrow
            (about 192 at 2048 rows) or that has few rows, or a patch embedding. ``0`` turns the rule
            off (sample every product the other rules allow: to study the estimators at small
            sizes). No rule applies to the projection sketches (judged by their FLOPs), to the
            activation sketch (which saves memory, not time) or on a device type with no fitted
            model (today: every type but ``"cpu"``; ``break_even.py --device cuda --fit`` fits one).
        compiler: one of :data:`COMPILERS`.
        filter: ``filter(module_path) -> bool`` chooses the layers to sample; a gradient of a layer
            it rejects stays exact. ``module_path`` is the layer's dotted path in the compiled
            module (``"blocks.0.attn.qkv"``; ``"<root>"`` for the module's own ``forward``), as
            in the report. ``None`` samples every layer.
    """

    p: Union[float, str] = 0.25
    grad: str = "weight"
    sketch: str = "norm"
    axis: Optional[str] = None
    seed: Optional[int] = None
    min_dim: int = 64
    min_speedup: float = 1.0
    compiler: str = "inductor"
    filter: Optional[Callable[[str], bool]] = None
    budget: float = 0.1
    budget_scale: str = "layer"
    strict: bool = False
    measure_every: int = 50
    sample_in_eval: bool = False

    def __post_init__(self) -> None:
        p = self.p
        if p != "auto":
            if isinstance(p, bool) or not isinstance(p, numbers.Real):
                raise TypeError(f"p must be a real number in (0, 1] or 'auto', got {p!r} of type {type(p).__name__}")
            if not (math.isfinite(p) and 0.0 < p <= 1.0):
                raise ValueError(f"p must be a real number in (0, 1] or 'auto', got {p!r}")
            object.__setattr__(self, "p", float(p))
        _one_of("grad", self.grad, GRAD_MODES)
        _one_of("sketch", self.sketch, SKETCHES)
        if self.axis is None:
            object.__setattr__(self, "axis", "rows" if self.adaptive else DEFAULT_AXIS[self.grad])
        _one_of("axis", self.axis, AXES)
        _one_of("compiler", self.compiler, COMPILERS)
        _one_of("budget_scale", self.budget_scale, BUDGET_SCALES)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.min_dim, bool) or not isinstance(self.min_dim, int) or self.min_dim < 1:
            raise ValueError(f"min_dim must be a positive int, got {self.min_dim!r}")
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, numbers.Real) or not (
                math.isfinite(self.min_speedup) and self.min_speedup >= 0):
            raise ValueError(f"min_speedup must be a finite real number >= 0, got {self.min_speedup!r}")
        object.__setattr__(self, "min_speedup", float(self.min_speedup))
        if self.filter is not None and not callable(self.filter):
            raise TypeError(f"filter must be a callable module_path -> bool or None, got {self.filter!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real) or not (
                math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget must be a positive real number, got {self.budget!r}")
        if isinstance(self.measure_every, bool) or not isinstance(self.measure_every, int) or self.measure_every < 1:
            raise ValueError(f"measure_every must be a positive int, got {self.measure_every!r}")
        if not isinstance(self.strict, bool):
            raise TypeError(f"strict must be a bool, got {self.strict!r}")
        if not isinstance(self.sample_in_eval, bool):
            raise TypeError(f"sample_in_eval must be a bool, got {self.sample_in_eval!r}")
        if self.draws_in_forward and (self.grad, self.axis) != ("weight", "rows"):
            raise ValueError(
                "sketch='activation' draws the weight gradients' batch/token rows in the forward pass: use "
                f"grad='weight', axis='rows' (got grad={self.grad!r}, axis={self.axis!r}), or another sketch")
        if self.adaptive and (self.grad not in ("weight", "both") or (self.axis, self.sketch) != ("rows", "norm")):
            raise ValueError(
                "p='auto' controls the batch/token rows of the weight gradients (and with grad='both' of the "
                "propagated gradients) with the norm sketch: use grad='weight' or 'both', axis='rows', "
                f"sketch='norm' (got grad={self.grad!r}, axis={self.axis!r}, sketch={self.sketch!r}), or give a number p")

    @property
    def draws_in_forward(self) -> bool:
        """Whether the rows are drawn in the forward pass, saving only the kept ones (``sketch="activation"``)."""
        return self.sketch == "activation"

    @property
    def adaptive(self) -> bool:
        """Whether the keep fractions are chosen during training (``p="auto"``)."""
        return self.p == "auto"


OPTIONS = tuple(field.name for field in dataclasses.fields(SamplingConfig))
"""The backend's option names, in :class:`SamplingConfig`'s order."""


def make_config(*args: object, **options: object) -> SamplingConfig:
    """``SamplingConfig(*args, **options)``, refusing an unknown option by naming the valid ones."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown ubcompile option(s) {', '.join(map(repr, unknown))}; the options are "
                        f"{', '.join(OPTIONS)}")
    return SamplingConfig(*args, **options)
