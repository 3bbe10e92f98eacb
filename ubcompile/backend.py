"""The ``torch.compile`` backend object."""

from __future__ import annotations

import functools
import logging
import os
import weakref
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from ._torch_private import (compile_eager_with_joint_pass, compile_with_joint_pass, compiling_frame_modules,
                             guard_training_flags, mode_options)
from .auto import AutoController
from .config import SamplingConfig, make_config
from .passes import JointSamplingPass
from .passes.seed_input import HANDLE_NAME, SEED_NAME, calling_with, extra_inputs, graph_device, seed_example
from .report import GraphReport, Report
from . import draw_ops  # noqa: F401  (registers the torch.ops.ubcompile draw ops)
from . import report_store
from .sampler import GraphStream, Sampler

log = logging.getLogger("ubcompile")

REPORT_ENV = "UBCOMPILE_REPORT"
"""Set to ``1`` to log every compiled graph's report (logger ``"ubcompile"``, level INFO)."""


class Backend:
    """A ``torch.compile`` backend that samples gradient GEMMs, then compiles with Inductor.

    It keeps a :class:`~ubcompile.report.GraphReport` for every graph it sampled (:meth:`report`),
    with the rewritten joint graph's code and the backward graph's code.

    Only modules in training mode are sampled (unless ``config.sample_in_eval``): the backend makes
    Dynamo guard on the compiled module's ``training`` flag, so after ``eval()`` the graph is
    recompiled once, without the pass, and its gradients are exact.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        auto = AutoController(config.budget, config.measure_every, config.budget_scale,
                              config.min_speedup) if config.adaptive else None
        self.sampler = Sampler(config.seed, auto)
        self.graphs: list[GraphReport] = []
        self._warned: set[Any] = set()
        self._domains: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"ubcompile.Backend({self.config})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
                 options: Optional[dict[str, Any]] = None) -> Any:
        """Compile one Dynamo graph; ``mode`` is ``torch.compile``'s (``options`` belong to the
        string backend ``"ubcompile"``, see :func:`default_backend`)."""
        if options:
            raise TypeError("torch.compile(options=...) configures backend='ubcompile'; this backend object has its "
                            f"options already ({self.config}): pass them to ubcompile.backend(...)")
        compile_fn = self._compiler(mode)
        if not self._samples(example_inputs):
            return compile_fn(gm, example_inputs, None, lambda graph: None)
        parameters = [isinstance(t, torch.nn.Parameter) for t in example_inputs]
        stream = self.sampler.stream(self._domain())
        return self._compile_seeded(gm, example_inputs, compile_fn, stream, parameters)

    def _compile_seeded(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], compile_fn: Callable[..., Any],
                        stream: GraphStream, parameters: list[bool]) -> Callable[..., Any]:
        """Compile ``gm`` with a seed input (:mod:`.passes.seed_input`), called with a fresh seed from
        ``stream`` each time, and under ``p="auto"`` the stream's handle. The graph is pure, so
        Inductor's caches may serve it; on an AOTAutograd hit the pass does not run and the report
        comes from :mod:`.report_store`."""
        device = graph_device(example_inputs)
        handle = [stream.handle] if self.config.adaptive else []
        names = [SEED_NAME, HANDLE_NAME][:1 + len(handle)]
        recorder = _Recorder(self)
        joint_pass = JointSamplingPass(self.config, recorder.on_report, [*parameters, *[False] * len(names)],
                                       self._fallback, seed_input=len(example_inputs))
        caches = self.config.compiler == "inductor"
        if caches:
            recorder.store_key = report_store.report_key(gm, example_inputs, joint_pass.uuid())
        with extra_inputs(gm, names):
            compiled = compile_fn(gm, [*example_inputs, seed_example(device), *handle], joint_pass,
                                  recorder.on_backward_graph, **({"caches": True} if caches else {}))
        if caches and not recorder.reports:  # served by AOTAutograd's cache: the pass did not run
            self._report_from_store(recorder)
        return _holding(calling_with(compiled, lambda: (stream.next_seed(device), *handle)), stream)

    def _compiler(self, mode: Optional[str]) -> Callable[..., Any]:
        """What compiles the graphs under ``torch.compile(mode=mode)``: Inductor with that mode's
        options, or the eager runner (which has no mode)."""
        if self.config.compiler == "eager":
            if mode not in (None, "default"):
                raise ValueError(f"compiler='eager' runs the graphs op by op: mode={mode!r} has nothing to tune; "
                                 "use compiler='inductor' or leave mode unset")
            return compile_eager_with_joint_pass
        if mode == "reduce-overhead":
            raise ValueError("mode='reduce-overhead' captures the step in CUDA graphs, which cannot replay ubcompile's "
                             "draws today (p='auto''s controller runs Python at every call, which a replay skips; the "
                             "fixed-p ops were never captured on a GPU); use mode='default' or "
                             "'max-autotune-no-cudagraphs'")
        options = mode_options(mode)
        if options.pop("triton.cudagraphs", False):
            self._warn_once("cudagraphs", f"ubcompile: mode={mode!r} without its CUDA graphs, which cannot replay "
                            "ubcompile's draws today; the rest of the mode (autotuning) applies")
        return functools.partial(compile_with_joint_pass, options=options)

    def _report_from_store(self, recorder: _Recorder) -> None:
        """The report of a graph AOTAutograd's cache served, as the process that compiled it stored it."""
        stored = report_store.load(recorder.store_key)
        if stored is None:
            self._warn_once(("store", recorder.store_key), "ubcompile: a graph came from AOTAutograd's cache without "
                            "its stored report, so backend.report() leaves it out. Delete Inductor's cache directory "
                            f"({report_store.inductor_cache_dir()}) to compile it afresh.")
            return
        recorder.on_report(stored)

    def _samples(self, example_inputs: Sequence[Any]) -> bool:
        """Whether the graph being compiled gets the sampling pass: unless ``sample_in_eval``, only
        when the frame's modules train, and Dynamo then guards on their ``training`` flags.

        The modules are the frame's local ``nn.Module`` variables that hold trainable parameters
        (all of them if none does). A graph that cannot be differentiated needs no decision; one
        with no module (a compiled function) is sampled, with a warning if it has trainable
        ``nn.Parameter`` inputs whose module could not be found.
        """
        differentiable = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs)
        if self.config.sample_in_eval or not differentiable:
            return True
        modules = compiling_frame_modules()
        if modules is None:
            self._warn_once("frame", "ubcompile could not see the frame Dynamo compiles, so it samples this graph "
                            "even if its module is in eval() mode. Pass sample_in_eval=True to silence this.")
            return True
        owners = {name: m for name, m in modules.items() if any(p.requires_grad for p in m.parameters())}
        deciding = owners or modules
        if not deciding:
            if any(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in example_inputs):
                self._warn_once("module", "ubcompile found no nn.Module among the compiled frame's local variables "
                                "(is the model a global?), so it samples this graph even in eval() mode. Pass "
                                "sample_in_eval=True to silence this, or compile the module itself.")
            return True
        guard_training_flags(deciding)
        return all(m.training for m in deciding.values())

    def _domain(self) -> int:
        """The number of the model the graph being compiled belongs to: of the frame's ``self``
        (or its first module variable), 0 for a frame without one. The graphs of one model split by
        graph breaks share it; two models compiled with this backend do not."""
        modules = compiling_frame_modules() or {}
        owner = modules.get(("self",)) or next(iter(modules.values()), None)
        if owner is None:
            return 0
        return self._domains.setdefault(owner, len(self._domains) + 1)

    def _fallback(self, node: torch.fx.Node, reason: str) -> None:
        """A rewrite failed and its gradient stays exact: warn once per node and reason."""
        self._warn_once((node.name, reason),
                        f"ubcompile: node {node.name} ({node.target}) {reason}; training continues with its "
                        "exact gradient. Pass strict=True to raise instead.")

    def _warn_once(self, key: Any, message: str) -> None:
        """A ``RuntimeWarning``, also logged, the first time ``key`` is seen."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's random state: save it with the training checkpoint."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, so a resumed run draws what the original run would have."""
        self.sampler.load_state_dict(state)

    def report(self) -> Report:
        """What this backend did so far, over every graph it compiled."""
        return Report(list(self.graphs), self.sampler.auto)


class _Recorder:
    """Where the report of one graph being compiled goes: the backend's list, the log, and (with a
    ``store_key``) the report store, once its backward graph is known."""

    def __init__(self, backend: Backend, store_key: Optional[str] = None) -> None:
        self.backend = backend
        self.store_key = store_key
        self.reports: list[GraphReport] = []

    def on_report(self, report: GraphReport) -> None:
        self.reports.append(report)
        if self.store_key is not None:
            report_store.remember(self.store_key, report)
        graphs = self.backend.graphs
        graphs.append(report)
        if os.environ.get(REPORT_ENV, "0") not in ("", "0"):
            _ensure_handler()
            log.info("ubcompile rewrote graph %d:\n%s", len(graphs) - 1, Report([report]).table())

    def on_backward_graph(self, graph: torch.fx.GraphModule) -> None:
        if self.reports:
            self.reports[-1].backward_graph = _snapshot(graph)
            if self.store_key is not None:
                report_store.save(self.store_key, self.reports[-1])


def _holding(compiled: Callable[..., Any], stream: GraphStream) -> Callable[..., Any]:
    """``compiled``, keeping ``stream`` alive for as long as the compiled graph is (a ``p="auto"``
    graph takes it by id; the process's registry of streams holds none)."""

    @functools.wraps(compiled)
    def run(*args: Any) -> Any:
        return compiled(*args)

    run.__ubcompile_stream__ = stream  # functools.wraps copied compiled's attributes (_boxed_call)
    return run


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


def backend(*args: Any, **options: Any) -> Backend:
    """A ubcompile backend: ``torch.compile(model, backend=ubcompile.backend(p=0.25))``.

    ``args`` and ``options`` are :class:`~ubcompile.config.SamplingConfig`'s fields (``p`` may be
    given by position), with its defaults: each default lives there only. The default, chosen by
    measurement (README, "Defaults"), samples a fraction ``p`` of the batch/token rows of every
    weight-gradient GEMM with the minimal-variance norm sketch and keeps the propagated gradients
    exact; ``p="auto"`` chooses that fraction per layer during training so that the added variance,
    each over its layer's squared gradient norm and summed over the layers, stays within ``budget``
    times their minibatch-SGD variance, scaled alike;
    ``grad="both"`` samples a fraction ``p`` of each layer's output features for both of its
    gradient GEMMs (cheaper, noisier: the noise compounds with depth). A module in ``eval()`` mode
    gets exact gradients unless ``sample_in_eval=True``.
    """
    return Backend(make_config(*args, **options))


def default_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: Optional[str] = None,
                    options: Optional[dict[str, Any]] = None) -> Any:
    """Entry point for ``torch.compile(backend="ubcompile", mode=..., options={...})``: a fresh
    backend per compiled graph, ``options`` being its options (:class:`~ubcompile.config.SamplingConfig`'s
    fields). Its graphs draw independently all the same (:mod:`ubcompile.sampler`)."""
    return backend(**(options or {}))(gm, example_inputs, mode=mode)
