"""Statistical checks for users' regression tests (and the project's own).

An unbiased estimator's mean over ``D`` independent draws differs from the exact value by about
its standard error ``sd / sqrt(D)``. :func:`z_scores` measures that difference, in standard errors,
along a few fixed directions: the exact value's own direction (where a scale error shows most)
and random ones. Under unbiasedness each z-score, its standard error measured from the same
``D`` draws, is approximately Student-t with ``D - 1`` degrees of freedom, so ``max |z|``
exceeds the Bonferroni bound :func:`critical_t` with probability at most ``alpha`` (the normal
bound :func:`critical_z` would be exceeded 10x as often at 20 draws).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import pathlib
import warnings
from typing import Any, Callable, Optional, Union

import torch
import torch.fx
from torch import Tensor

# Deterministic discrepancy allowed between two exact float32 computations (different kernels),
# relative to the norm of the whole value: the floor of the standard error for entries that are
# never sampled. Rounding error is bounded by the norm of the vector, not of its projection on a
# direction: a sum that cancels (a batch-norm bias gradient) has a small projection and the same
# absolute rounding error as its summands.
FLOAT32_RTOL = 1e-4


def critical_z(num_tests: int, alpha: float = 1e-3) -> float:
    """Two-sided normal quantile with Bonferroni correction over ``num_tests`` z-scores."""
    return float(torch.special.ndtri(torch.tensor(1.0 - alpha / (2 * num_tests), dtype=torch.float64)))


def critical_t(num_tests: int, dof: int, alpha: float = 1e-3) -> float:
    """:func:`critical_z` for t-statistics with ``dof`` degrees of freedom: the Cornish-Fisher
    expansion of the t quantile in ``1 / dof`` (Abramowitz & Stegun 26.7.5, four terms). Its tail
    probability is within 1% of ``alpha / (2 num_tests)`` from 19 degrees of freedom on, for up
    to 1000 tests, and within 14% from 9; fewer draws than 10 make the bound a little too small."""
    z = critical_z(num_tests, alpha)
    terms = ((z**3 + z) / 4,
             (5 * z**5 + 16 * z**3 + 3 * z) / 96,
             (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(term / dof**power for power, term in enumerate(terms, start=1))


def _directions(exact: Tensor, num_random: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(num_random, exact.numel(), generator=gen, dtype=torch.float64)
    dirs = torch.cat([exact.reshape(1, -1).double(), rand])
    return dirs / dirs.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


@dataclasses.dataclass(frozen=True)
class ZTest:
    """Result of :func:`z_scores`: the z-scores and the bound they must stay under."""

    z: Tensor
    bound: float

    @property
    def passed(self) -> bool:
        return bool(self.z.abs().max() <= self.bound)

    def __str__(self) -> str:
        return (f"max |z| = {self.z.abs().max():.2f} (bound {self.bound:.2f}), "
                f"mean z^2 = {self.z.pow(2).mean():.2f} (about 1 when unbiased)")


class ZAccumulator:
    """The statistics of :func:`z_scores` gathered one draw at a time, in memory proportional to the
    value's size (its 16 directions), not to the number of draws: a model's every parameter can be
    tested over hundreds of draws (ResNet-18's 11.2M parameters need 1.4 GB, where keeping
    ``draws=200`` of its gradients needed 17 GB)."""

    def __init__(self, exact: Tensor, *, num_random: int = 15, seed: int = 0, floor_scale: float = 0.0) -> None:
        self.dirs = _directions(exact, num_random, seed)
        self.target = exact.reshape(-1).double() @ self.dirs.T
        self.exact_norm = exact.double().norm().clamp_min(floor_scale)
        self.projections: list[Tensor] = []
        self.norms: list[Tensor] = []

    def add(self, sample: Tensor) -> None:
        """Take one draw of the estimate (``exact``'s shape)."""
        flat = sample.detach().reshape(-1).double()
        self.projections.append(self.dirs @ flat)
        self.norms.append(flat.norm())

    def result(self, alpha: float = 1e-3) -> ZTest:
        """Each z-score is ``(mean - exact) / se`` along one direction, ``se`` the measured standard
        error of the mean, floored by :data:`FLOAT32_RTOL` of the value's norm (at least
        ``floor_scale``) so that entries computed exactly (zero variance) are compared up to float
        rounding."""
        d = len(self.projections)
        if d < 2:
            raise ValueError("need at least 2 draws")
        proj = torch.stack(self.projections)
        se = proj.std(dim=0) / d**0.5
        scale = torch.maximum(self.exact_norm, torch.stack(self.norms).mean())
        floor = FLOAT32_RTOL * scale + torch.finfo(torch.float32).tiny
        z = (proj.mean(dim=0) - self.target) / torch.sqrt(se**2 + floor**2)
        return ZTest(z, critical_t(len(z), d - 1, alpha))


def z_scores(samples: Tensor, exact: Tensor, *, num_random: int = 15, alpha: float = 1e-3, seed: int = 0) -> ZTest:
    """Z-scores of the mean of ``samples`` (``D`` draws along dim 0) against ``exact``
    (:class:`ZAccumulator`)."""
    accumulator = ZAccumulator(exact, num_random=num_random, seed=seed)
    for sample in samples:
        accumulator.add(sample)
    return accumulator.result(alpha)


def assert_unbiased_samples(samples: Tensor, exact: Tensor, name: str = "estimate", **kwargs: Any) -> ZTest:
    """Raise AssertionError if ``samples`` are not consistent with an unbiased estimator of ``exact``."""
    result = z_scores(samples, exact, **kwargs)
    if not result.passed:
        raise AssertionError(f"{name} looks biased: {result}")
    return result


def gradient_draws(loss: Callable[[], Tensor], params: list[Tensor], draws: int) -> list[Tensor]:
    """``draws`` gradients of ``loss()`` with respect to each of ``params``, stacked along dim 0
    (memory: ``draws`` copies of the parameters; :func:`assert_unbiased` streams instead)."""
    grads = [torch.autograd.grad(loss(), params) for _ in range(draws)]
    return [torch.stack([g[i].detach() for g in grads]) for i in range(len(params))]


def assert_unbiased(model: torch.nn.Module, loss_fn: Callable[[Any], Tensor], *inputs: Any, draws: int = 200,
                    backend: Optional[Any] = None, alpha: float = 1e-3) -> dict[str, ZTest]:
    """Check that ``torch.compile(model, backend=backend)`` gives unbiased gradients on ``inputs``.

    Exact gradients come from ``model`` run eagerly; ``draws`` sampled gradients from the compiled
    model, their statistics gathered as they come (:class:`ZAccumulator`: memory proportional to
    the parameters, not to ``draws``). Every parameter is tested; ``alpha`` bounds the false-alarm
    probability of each. Float rounding is judged against at least each parameter's fair share of
    the model's gradient norm (:func:`_fair_shares`): a gradient that is zero analytically (the key
    bias of attention) is a sum whose terms cancel, and two compilers' rounding of it differs by
    far more than its own norm; a scale error is still caught on any parameter whose gradient is
    at least about 1/1000 of its share. Returns the z-test of each parameter, by name; the AssertionError lists
    every parameter that failed.
    """
    if backend is None:
        from .backend import backend as make_backend
        backend = make_backend()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    exact = torch.autograd.grad(loss_fn(model(*inputs)), params)
    compiled = torch.compile(model, backend=backend)
    accumulators = gradient_accumulators(exact)
    for _ in range(draws):
        for accumulator, grad in zip(accumulators, torch.autograd.grad(loss_fn(compiled(*inputs)), params)):
            accumulator.add(grad)
    report = getattr(backend, "report", None)
    if callable(report) and not report().sampled:
        warnings.warn("assert_unbiased: the backend sampled no gradient product, so this test says nothing about "
                      "its estimators; backend.report() gives each product's reason (on a small model on a CPU, "
                      "usually the cost rule: pass min_speedup=0 to sample it anyway)", stacklevel=2)
    results = {name: accumulator.result(alpha) for (name, _), accumulator in zip(named, accumulators)}
    biased = [f"gradient of {name} looks biased: {result}" for name, result in results.items() if not result.passed]
    if biased:
        raise AssertionError("\n".join(biased))
    return results


def gradient_accumulators(exact: list[Tensor]) -> list[ZAccumulator]:
    """A :class:`ZAccumulator` for each of a model's exact gradients, each judging rounding against
    at least its fair share of the model's gradient norm (:func:`_fair_shares`), as
    :func:`assert_unbiased` does: for a test that draws the gradients itself (a sharded model's)."""
    return [ZAccumulator(e, floor_scale=s) for e, s in zip(exact, _fair_shares(exact))]


def _fair_shares(grads: list[Tensor]) -> list[float]:
    """``||g|| sqrt(numel_p / numel)`` for each parameter ``p``: its share of the whole gradient's
    norm ``||g||`` if every entry of the model had the same magnitude."""
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    numel = sum(g.numel() for g in grads)
    return [total * math.sqrt(g.numel() / numel) for g in grads]


SNAPSHOT_UPDATE_ENV = "UBCOMPILE_UPDATE_SNAPSHOTS"
"""Set to ``1`` to make :func:`assert_graph_snapshot` rewrite the stored files instead of comparing."""


def _render(arg: Any) -> str:
    if isinstance(arg, torch.fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_render(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    return repr(arg)


def _value(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, Tensor):
        return f": {str(val.dtype).removeprefix('torch.')}[{', '.join(str(d) for d in val.shape)}]"
    return ""


def _call(node: torch.fx.Node) -> str:
    args = [_render(a) for a in node.args] + [f"{k}={_render(v)}" for k, v in node.kwargs.items()]
    return f"{node.target}({', '.join(args)})"


def graph_text(graph: torch.fx.GraphModule) -> str:
    """A normalised, readable text of ``graph``: one line per node with its dtype and shape.

    What varies between runs of the same code is left out: source locations. (No process-local
    value is in a graph: the backend's stream reaches ``p="auto"``'s ops as an input.)
    """
    lines = []
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"{node.name}{_value(node)} = input")
        elif node.op == "output":
            lines.append(f"return {_render(node.args[0])}")
        else:
            lines.append(f"{node.name}{_value(node)} = {_call(node) if node.op == 'call_function' else node.target}")
    return "\n".join(lines) + "\n"


def backward_snapshot(backend: Any) -> str:
    """:func:`graph_text` of every backward graph ``backend`` compiled, in order."""
    texts = [graph_text(g.backward_graph) if g.backward_graph is not None else g.stored_backward[1]
             for g in backend.graphs]
    return "".join(f"# backward graph {i}\n{text}" for i, text in enumerate(t for t in texts if t))


def assert_graph_snapshot(backend: Any, path: Union[str, pathlib.Path], update: Optional[bool] = None) -> None:
    """Compare :func:`backward_snapshot` of ``backend`` with the text stored at ``path``.

    With ``update=True`` (or the environment variable :data:`SNAPSHOT_UPDATE_ENV` set to ``1``), or
    when ``path`` does not exist yet, the file is written instead. Snapshots depend on the torch
    release that traced the graphs: keep one per supported release if you test several.
    """
    path = pathlib.Path(path)
    text = backward_snapshot(backend)
    if update is None:
        update = os.environ.get(SNAPSHOT_UPDATE_ENV, "0") not in ("", "0")
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    stored = path.read_text()
    if stored != text:
        diff = "".join(difflib.unified_diff(stored.splitlines(True), text.splitlines(True), str(path), "now"))
        raise AssertionError(f"backward graph differs from the snapshot {path} (update it with "
                             f"{SNAPSHOT_UPDATE_ENV}=1 if the change is intended):\n{diff}")
