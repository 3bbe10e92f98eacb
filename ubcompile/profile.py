"""``ubcompile.profile``: what sampling costs in gradient noise, against what it saves per step.

For each linear layer the profile measures, on one batch:

* the backward GEMM FLOPs of the layer, exact and sampled (from the backend's report);
* the sketch's added variance of the layer's weight gradient, ``V_sketch = sum_e Var(g_e)`` over
  ``draws`` sampled gradients of the same batch, and its closed form where one exists;
* the minibatch-SGD variance of the same exact gradient, ``V_sgd``, from the spread of the
  gradients of ``chunks`` equal slices of the batch (``Var(mean of B) = Var(slice) / chunks``).

The paper's trade-off: in the noise-dominated regime SGD needs about ``1 + V_sketch / V_sgd`` times
as many steps, each costing ``c`` of an exact one, so time to accuracy changes by
``c * (1 + V_sketch / V_sgd)``. Here ``c`` is the layer's own GEMM cost per step (forward GEMM plus
backward GEMMs), sampled over exact; the verdict says whether that product is below 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from tabulate import tabulate
from torch import Tensor

from .backend import Backend, backend as make_backend
from .sketches import keep_count
from .sketches.norm import contraction_importance, contraction_poisson_total_variance, output_importance, water_fill
from .sketches.uniform import contraction_total_variance


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    module: str
    exact_flops: int  # forward GEMM + backward GEMMs of the layer, exact
    sampled_flops: int  # the same with the backend's rewrites
    grad_sq_norm: float  # ||exact weight gradient||^2
    sketch_variance: float  # measured over draws
    sgd_variance: float
    predicted_variance: Optional[float] = None  # closed form, where one exists

    @property
    def cost_ratio(self) -> float:
        """NaN when the report attributes no GEMM to this module (e.g. ``out_proj`` of
        ``nn.MultiheadAttention``, whose GEMMs are attributed to the attention module)."""
        return self.sampled_flops / self.exact_flops if self.exact_flops else float("nan")

    @property
    def variance_ratio(self) -> float:
        return self.sketch_variance / self.sgd_variance if self.sgd_variance > 0 else float("inf")

    @property
    def time_to_accuracy(self) -> float:
        """Predicted time to accuracy relative to exact: ``cost_ratio * (1 + variance_ratio)``."""
        return self.cost_ratio * (1.0 + self.variance_ratio)

    @property
    def verdict(self) -> str:
        if self.sampled_flops == self.exact_flops and self.sketch_variance == 0:
            return "exact"
        if not self.exact_flops:
            return "GEMMs attributed to a parent module in the report"
        verb = "saves" if self.time_to_accuracy < 1 else "costs"
        return f"sampling {verb} time to accuracy at this p ({self.time_to_accuracy:.2f}x)"


@dataclasses.dataclass(frozen=True)
class Profile:
    layers: list[LayerProfile]
    draws: int
    chunks: int

    def table(self) -> str:
        rows = [[lp.module, f"{lp.exact_flops / 1e9:.3f}", f"{lp.sampled_flops / 1e9:.3f}",
                 f"{lp.sketch_variance / lp.grad_sq_norm:.3g}",
                 "-" if lp.predicted_variance is None else f"{lp.predicted_variance / lp.grad_sq_norm:.3g}",
                 f"{lp.sgd_variance / lp.grad_sq_norm:.3g}", f"{lp.variance_ratio:.3g}", lp.verdict]
                for lp in self.layers]
        headers = ["layer", "GFLOP exact", "GFLOP sampled", "sketch var / |g|^2", "predicted",
                   "SGD var / |g|^2", "sketch / SGD", "verdict"]
        note = (f"variances of each layer's weight gradient on one batch: sketch over {self.draws} draws, "
                f"SGD from {self.chunks} slices of the batch")
        return tabulate(rows, headers=headers) + "\n" + note

    def __str__(self) -> str:
        return self.table()


def _loss(model: Callable[..., Any], loss_fn: Callable[..., Tensor], inputs: tuple, targets: Any) -> Tensor:
    out = model(*inputs)
    return loss_fn(out) if targets is None else loss_fn(out, targets)


@contextlib.contextmanager
def _capture_linear_io(linears: dict[str, nn.Linear]) -> Iterator[dict[str, dict[str, Tensor]]]:
    """Record each linear layer's input ``A`` and output cotangent ``G``, flattened to 2-D."""
    seen: dict[str, dict[str, Tensor]] = {name: {} for name in linears}
    handles = []

    def record(name: str, args: tuple, out: Tensor) -> None:
        seen[name]["A"] = args[0].detach().flatten(0, -2)
        out.register_hook(lambda grad: seen[name].__setitem__("G", grad.detach().flatten(0, -2)))

    for name, mod in linears.items():
        handles.append(mod.register_forward_hook(lambda m, args, out, name=name: record(name, args, out)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _predicted(io: dict[str, Tensor], backend: Backend, sampled: bool) -> Optional[float]:
    """Closed-form variance of a weight gradient sampled on batch rows alone (``grad="weight"``).

    Exact for the uniform sketch; for the norm and activation sketches, the Poisson formula (the
    fixed-size systematic design is close to it, not equal) at their probabilities.
    """
    config = backend.config
    if not sampled or config.grad != "weight" or config.axis != "rows" or "G" not in io:
        return None
    x, y = io["G"].T, io["A"]
    k = keep_count(x.shape[1], config.p)
    if config.sketch == "uniform":
        return float(contraction_total_variance(x, y, k))
    importance = output_importance(y, 0) if config.draws_in_forward else contraction_importance(x, y)
    return float(contraction_poisson_total_variance(x, y, water_fill(importance, k)))


def profile(model: nn.Module, loss_fn: Callable[..., Tensor], *inputs: Any, targets: Any = None,
            draws: int = 32, chunks: int = 8, backend: Optional[Backend] = None, **options: Any) -> Profile:
    """Profile ``model`` on one batch under ``backend`` (or ``ubcompile.backend(**options)``).

    ``loss_fn(output)`` (or ``loss_fn(output, targets)``) must average over the batch. ``inputs``
    and ``targets`` are split along dim 0 into ``chunks`` slices for the SGD variance. Only
    ``nn.Linear`` layers are profiled. ``model``'s ``.grad`` fields are not touched.
    """
    backend = backend or make_backend(**options)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad}
    weights = [m.weight for m in linears.values()]

    with _capture_linear_io(linears) as io:
        exact = torch.autograd.grad(_loss(model, loss_fn, inputs, targets), weights)
    slices = zip(*(t.chunk(chunks) for t in inputs), *([targets.chunk(chunks)] if targets is not None else []))
    per_slice = [torch.autograd.grad(_loss(model, loss_fn, tuple(s[:len(inputs)]),
                                           s[len(inputs)] if targets is not None else None), weights)
                 for s in slices]
    compiled = torch.compile(model, backend=backend)
    sampled = [torch.autograd.grad(_loss(compiled, loss_fn, inputs, targets), weights) for _ in range(draws)]

    report = backend.report()
    layers = []
    for i, name in enumerate(linears):
        entries = [e for e in report.entries if e.module == name]
        forward = sum(e.exact_flops for e in entries if e.role == "grad_weight")
        sgd = torch.stack([g[i] for g in per_slice]).double().var(0).sum() / len(per_slice)
        layers.append(LayerProfile(
            module=name,
            exact_flops=forward + sum(e.exact_flops for e in entries),
            sampled_flops=forward + sum(e.sampled_flops for e in entries),
            grad_sq_norm=float(exact[i].double().square().sum()),
            sketch_variance=float(torch.stack([g[i] for g in sampled]).double().var(0).sum()),
            sgd_variance=float(sgd),
            predicted_variance=_predicted(io[name], backend,
                                          any(e.sampled and e.role == "grad_weight" for e in entries)),
        ))
    return Profile(layers, draws, len(per_slice))
