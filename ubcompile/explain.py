"""``ubcompile.explain``: compile a model once and report what the backend would do to it."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .backend import Backend, backend as make_backend
from .report import Report


def explain(model: torch.nn.Module, *example_inputs: Any, backend: Optional[Backend] = None,
            loss_fn: Optional[Callable[[Any], torch.Tensor]] = None, **options: Any) -> Report:
    """Compile ``model`` with ``backend`` (or ``ubcompile.backend(**options)``), run one forward and
    backward on ``example_inputs`` and return the report. ``model``'s ``.grad`` fields are left as
    they were. ``loss_fn`` maps the output to a scalar (default: sum of the output). A model in
    ``eval()`` mode gets exact gradients (unless ``sample_in_eval=True``): its report is empty.
    """
    if backend is None:
        backend = make_backend(**options)
    elif options:
        raise TypeError(f"pass either backend= or backend options, not both (got {sorted(options)})")
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        out = torch.compile(model, backend=backend)(*example_inputs)
        (loss_fn(out) if loss_fn is not None else out.sum()).backward()
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad
    return backend.report()
