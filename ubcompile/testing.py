"""Statistical checks for users' regression tests (and the project's own).

An unbiased estimator's mean over ``D`` independent draws differs from the exact value by about
its standard error ``sd / sqrt(D)``. :func:`z_scores` measures that difference, in standard errors,
along a few fixed directions: the exact value's own direction (where a scale error shows most)
and random ones. Under unbiasedness each z-score is approximately standard normal, so
``max |z|`` exceeds the Bonferroni bound :func:`critical_z` with probability at most ``alpha``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
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


def z_scores(samples: Tensor, exact: Tensor, *, num_random: int = 15, alpha: float = 1e-3, seed: int = 0) -> ZTest:
    """Z-scores of the mean of ``samples`` (``D`` draws along dim 0) against ``exact``.

    Each z-score is ``(mean - exact) / se`` along one direction, ``se`` the measured standard error
    of the mean, floored by :data:`FLOAT32_RTOL` of the exact value's norm so that entries
    computed exactly (zero variance) are compared up to float rounding.
    """
    d = samples.shape[0]
    if d < 2:
        raise ValueError("need at least 2 draws")
    dirs = _directions(exact, num_random, seed)
    proj = samples.reshape(d, -1).double() @ dirs.T
    target = exact.reshape(-1).double() @ dirs.T
    se = proj.std(dim=0) / d**0.5
    scale = torch.maximum(exact.double().norm(), samples.reshape(d, -1).double().norm(dim=1).mean())
    floor = FLOAT32_RTOL * scale + torch.finfo(torch.float32).tiny
    z = (proj.mean(dim=0) - target) / torch.sqrt(se**2 + floor**2)
    return ZTest(z, critical_z(len(z), alpha))


def assert_unbiased_samples(samples: Tensor, exact: Tensor, name: str = "estimate", **kwargs: Any) -> ZTest:
    """Raise AssertionError if ``samples`` are not consistent with an unbiased estimator of ``exact``."""
    result = z_scores(samples, exact, **kwargs)
    if not result.passed:
        raise AssertionError(f"{name} looks biased: {result}")
    return result


def gradient_draws(loss: Callable[[], Tensor], params: list[Tensor], draws: int) -> list[Tensor]:
    """``draws`` gradients of ``loss()`` with respect to each of ``params``, stacked along dim 0."""
    grads = [torch.autograd.grad(loss(), params) for _ in range(draws)]
    return [torch.stack([g[i].detach() for g in grads]) for i in range(len(params))]


def assert_unbiased(model: torch.nn.Module, loss_fn: Callable[[Any], Tensor], *inputs: Any, draws: int = 200,
                    backend: Optional[Any] = None, alpha: float = 1e-3) -> dict[str, ZTest]:
    """Check that ``torch.compile(model, backend=backend)`` gives unbiased gradients on ``inputs``.

    Exact gradients come from ``model`` run eagerly; ``draws`` sampled gradients from the compiled
    model. Every parameter is tested; ``alpha`` bounds the false-alarm probability of each.
    Returns the z-test of each parameter, by name.
    """
    if backend is None:
        from .backend import backend as make_backend
        backend = make_backend()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    exact = torch.autograd.grad(loss_fn(model(*inputs)), params)
    compiled = torch.compile(model, backend=backend)
    samples = gradient_draws(lambda: loss_fn(compiled(*inputs)), params, draws)
    return {name: assert_unbiased_samples(s, e, name=f"gradient of {name}", alpha=alpha)
            for (name, _), s, e in zip(named, samples, exact)}
