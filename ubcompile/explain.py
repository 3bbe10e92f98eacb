"""``ubcompile.explain``: compile a model once and report what the backend would do to it."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .backend import Backend, backend as make_backend
from .config import OPTIONS
from .report import Report


def output_loss(out: Any) -> torch.Tensor:
    """A scalar to differentiate from a model's output: a tensor's sum; of a Hugging Face
    ``ModelOutput`` (or any mapping), its ``loss`` when it has one, else its first tensor's sum; of a
    tuple or list, its first element's."""
    if isinstance(out, torch.Tensor):
        return out.sum()
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of the fields that are set
        loss = out.get("loss")
        return loss if isinstance(loss, torch.Tensor) else output_loss(next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return output_loss(out[0])
    raise TypeError(f"cannot make a loss of a {type(out).__name__}: pass loss_fn=")


def explain(model: torch.nn.Module, *example_inputs: Any, backend: Optional[Backend] = None,
            loss_fn: Optional[Callable[[Any], torch.Tensor]] = None, **kwargs: Any) -> Report:
    """Compile ``model`` with ``backend`` (or ``ubcompile.backend(**options)``), run one forward and
    backward on ``example_inputs`` and return the report. ``model``'s ``.grad`` fields are left as
    they were. ``kwargs`` named as backend options (:data:`~ubcompile.config.OPTIONS`) are options;
    the others are the model's keyword inputs (``input_ids=...``). ``loss_fn`` maps the output to a
    scalar (default :func:`output_loss`). A model in ``eval()`` mode gets exact gradients (unless
    ``sample_in_eval=True``): its report is empty.
    """
    options = {name: value for name, value in kwargs.items() if name in OPTIONS}
    inputs = {name: value for name, value in kwargs.items() if name not in OPTIONS}
    if backend is None:
        backend = make_backend(**options)
    elif options:
        raise TypeError(f"pass either backend= or backend options, not both (got {sorted(options)})")
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        out = torch.compile(model, backend=backend)(*example_inputs, **inputs)
        (loss_fn or output_loss)(out).backward()
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad
    return backend.report()
