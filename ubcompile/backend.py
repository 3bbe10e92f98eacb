"""The ``torch.compile`` backend object."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx

from ._torch_private import compile_eager_with_joint_pass, compile_with_joint_pass
from .auto import AutoController
from .config import SamplingConfig
from .passes import JointSamplingPass
from .report import GraphReport, Report
from .sampler import Sampler

log = logging.getLogger("ubcompile")

REPORT_ENV = "UBCOMPILE_REPORT"
"""Set to ``1`` to log every compiled graph's report (logger ``"ubcompile"``, level INFO)."""


class Backend:
    """A ``torch.compile`` backend that samples gradient GEMMs, then compiles with Inductor.

    It keeps a :class:`~ubcompile.report.GraphReport` for every graph it compiled
    (:meth:`report`), with the rewritten joint graph's code and the backward graph's code.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        auto = AutoController(config.budget, config.measure_every) if config.adaptive else None
        self.sampler = Sampler(config.seed, auto)
        self.graphs: list[GraphReport] = []
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"ubcompile.Backend({self.config})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        current: list[GraphReport] = []

        def on_report(report: GraphReport) -> None:
            current.append(report)
            self.graphs.append(report)
            if os.environ.get(REPORT_ENV, "0") not in ("", "0"):
                _ensure_handler()
                log.info("ubcompile rewrote graph %d:\n%s", len(self.graphs) - 1, Report([report]).table())

        def on_backward_graph(graph: torch.fx.GraphModule) -> None:
            if current:
                current[-1].backward_graph = _snapshot(graph)

        parameters = [isinstance(t, torch.nn.Parameter) for t in example_inputs]
        joint_pass = JointSamplingPass(self.config, self.sampler.id, on_report, parameters, self._fallback)
        compile_fn = compile_with_joint_pass if self.config.compiler == "inductor" else compile_eager_with_joint_pass
        return compile_fn(gm, example_inputs, joint_pass, on_backward_graph)

    def _fallback(self, node: torch.fx.Node, reason: str) -> None:
        """A rewrite failed and its gradient stays exact: warn once per node and reason."""
        key = (node.name, reason)
        if key not in self._warned:
            self._warned.add(key)
            message = (f"ubcompile: node {node.name} ({node.target}) {reason}; training continues with its "
                       "exact gradient. Pass strict=True to raise instead.")
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's random state: save it with the training checkpoint."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, so a resumed run draws what the original run would have."""
        self.sampler.load_state_dict(state)

    def report(self) -> Report:
        """What this backend did so far, over every graph it compiled."""
        return Report(list(self.graphs), self.sampler.auto)


def _ensure_handler() -> None:
    """Make the report visible when the user configured no logging."""
    if not log.handlers and not logging.getLogger().handlers:
        log.addHandler(logging.StreamHandler())
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


def _snapshot(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm``'s node structure (meta shared), immune to Inductor's in-place passes."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def backend(p: Union[float, str] = 0.25, *, grad: str = "weight", sketch: str = "norm",
            axis: Optional[str] = None, seed: Optional[int] = None, min_dim: int = 64, compiler: str = "inductor",
            filter: Optional[Callable[[str], bool]] = None, budget: float = 1.0,
            measure_every: int = 50, strict: bool = False) -> Backend:
    """A ubcompile backend: ``torch.compile(model, backend=ubcompile.backend(p=0.25))``.

    See :class:`~ubcompile.config.SamplingConfig` for the options. The default, chosen by
    measurement (README, "Defaults"), samples a fraction ``p`` of the batch/token rows of every
    weight-gradient GEMM with the minimal-variance norm sketch and keeps the propagated gradients
    exact; ``p="auto"`` chooses that fraction per layer during training so that the added variance
    stays within ``budget`` times the layer's minibatch-SGD variance; ``grad="both"`` samples a fraction ``p`` of each layer's output features for both of its
    gradient GEMMs (cheaper, noisier: the noise compounds with depth).
    """
    return Backend(SamplingConfig(p=p, grad=grad, sketch=sketch, axis=axis, seed=seed, min_dim=min_dim,
                                  compiler=compiler, filter=filter, budget=budget, measure_every=measure_every,
                                  strict=strict))


def default_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Entry point for ``torch.compile(backend="ubcompile")``: a fresh default backend per compile."""
    return backend()(gm, example_inputs)
