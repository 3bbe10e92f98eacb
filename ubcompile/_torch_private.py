"""Every torch-private API ubcompile touches, in one place.

Each name below is an import from a private torch module whose location or signature has moved
between releases. Keeping them here means a torch upgrade breaks one file, not the passes.
Supported: torch 2.11 and later (:func:`check_torch_version`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx

from torch._dynamo.backends.common import aot_autograd
from torch._functorch import config as _functorch_config
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental import _config as _fx_config
from torch.fx.experimental.proxy_tensor import make_fx

try:  # Dynamo's view of the frame it compiles; callers fall back to sampling (with a warning) without it
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import AttrSource, GetItemSource, LocalSource
    from torch._dynamo.symbolic_convert import InstructionTranslator
except ImportError:
    InstructionTranslator = None

OLDEST_TORCH = (2, 11)
"""The oldest release whose private APIs this module knows."""

NEWEST_KNOWN_TORCH = (2, 15)
"""The newest release whose private symbols were checked (signatures read in 2.14.1 and 2.15.0, the
suite run on 2.13 and 2.14.1, README "Supported torch"); a newer one imports with a warning."""

__all__ = [
    "CustomGraphPass",
    "check_torch_version",
    "body_compile_settings",
    "compile_eager_with_joint_pass",
    "compile_with_joint_pass",
    "compiling_frame_modules",
    "mode_options",
    "guard_training_flags",
    "inductor_cache_dir",
    "mark_sourceless_input",
    "register_manual_seed",
    "size_hint",
    "trace_with_fake",
]


def check_torch_version(version: str = torch.__version__) -> None:
    """Raise ImportError for a torch older than :data:`OLDEST_TORCH`; warn (once) for one newer
    than :data:`NEWEST_KNOWN_TORCH`, whose private APIs may have moved."""
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    if (major, minor) < OLDEST_TORCH:
        raise ImportError(f"ubcompile needs torch {OLDEST_TORCH[0]}.{OLDEST_TORCH[1]} or later, found {version}. "
                          "Upgrade torch (e.g. `pip install -U torch`).")
    if (major, minor) > NEWEST_KNOWN_TORCH:
        warnings.warn(f"ubcompile was checked against torch up to {NEWEST_KNOWN_TORCH[0]}.{NEWEST_KNOWN_TORCH[1]}; "
                      f"found {version}. It should work; if a compile fails inside ubcompile, please report it "
                      "with the torch version.", UserWarning, stacklevel=3)


def size_hint(size: Any) -> int:
    """The concrete value of a size, ``int`` or ``SymInt`` (its example value), without adding a guard."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            raise ValueError(f"symbolic size {size} has no example value")
        return int(hint)
    return int(size)


LocalPath = tuple[Any, ...]
"""A local variable of a frame, ``(name,)``, or an item of one, ``(name, index)``."""


def compiling_frame_modules() -> Optional[dict[LocalPath, torch.nn.Module]]:
    """The ``nn.Module`` local variables of the frame Dynamo is compiling, and the modules held in its
    tuple, list and dict variables, by path.

    That is ``("self",)`` in a compiled module's ``forward`` (``fn`` for a module whose ``forward``
    Dynamo wraps, as ``nn.Sequential``), the modules passed to a compiled function, or
    ``("args", 0)`` where ``forward`` is wrapped by a decorator that takes ``*args`` (Hugging Face's
    Llama, Mistral, Qwen: the frame compiled is the wrapper's). ``None`` when no frame is being
    compiled (the backend was called outside Dynamo) or Dynamo's internals moved.
    """
    if InstructionTranslator is None:
        return None
    try:
        f_locals = InstructionTranslator.current_tx().f_locals
    except AttributeError:
        return None
    found: dict[LocalPath, torch.nn.Module] = {}
    for name, value in f_locals.items():
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (tuple, list)) else ()
        if isinstance(value, torch.nn.Module):
            found[(name,)] = value
        for key, item in items:
            if isinstance(item, torch.nn.Module):
                found[(name, key)] = item
    return found


def guard_training_flags(paths: Iterable[LocalPath]) -> None:
    """Make Dynamo recompile the frame it is compiling when the ``training`` flag of any of its local
    variables at ``paths`` (from :func:`compiling_frame_modules`) changes, as if the frame had read it."""
    def source(path: LocalPath) -> Any:
        base = LocalSource(path[0])
        return base if len(path) == 1 else GetItemSource(base, path[1])

    install_guard(*(AttrSource(source(path), "training").make_guard(GuardBuilder.CONSTANT_MATCH)
                    for path in paths))


class body_compile_settings:
    """While the context is open: Dynamo's per-code-object recompile limit raised to at least
    ``limit``, no duck sizing (``use_duck_shape``) and parameters' sizes as dynamic as any tensor's
    (``force_parameter_static_shapes``). A body traced with dynamic shapes would otherwise guard
    that two sizes equal at its first call stay equal (a 64 x 64 operand), and compile again at the
    first call where they differ; and an operand that is a layer's weight (``G W``, the propagated
    gradient) would be traced at its static size, compiling the body again for every weight shape
    of the model (5-10 s each on a 2-core CPU). Set and restored by hand in a plain class
    (``config.patch`` cost 17 us a call more, when this set fewer options). Entering and leaving
    takes about 21 us a call, 14 before the third setting (2026-12-07, one loaded CPU core): each
    read or write of a Dynamo config attribute runs Python code."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        dynamo = torch._dynamo.config
        self.old = dynamo.recompile_limit, _fx_config.use_duck_shape, dynamo.force_parameter_static_shapes
        dynamo.recompile_limit = max(self.old[0], self.limit)
        _fx_config.use_duck_shape = False
        dynamo.force_parameter_static_shapes = False

    def __exit__(self, *exc: object) -> None:
        dynamo = torch._dynamo.config
        dynamo.recompile_limit, _fx_config.use_duck_shape, dynamo.force_parameter_static_shapes = self.old


def mark_sourceless_input(node: torch.fx.Node) -> None:
    """Tell AOTAutograd that the Dynamo-graph placeholder ``node`` was added after Dynamo and comes
    from no user variable (as the DDP optimizer's submodule inputs do): it needs no guard."""
    node._dynamo_source = None


def register_manual_seed(manual_seed: Callable[[int], torch.Generator]) -> None:
    """Make ``manual_seed`` (a wrapper of torch's) ``torch.manual_seed``, as Dynamo installs its own
    wrapper: hidden from Dynamo and known to TorchScript as ``aten::manual_seed``."""
    torch.manual_seed = torch._disable_dynamo(manual_seed)
    torch.jit._builtins._register_builtin(torch.manual_seed, "aten::manual_seed")


def trace_with_fake(fn: Callable[..., Any], fake_args: Sequence[Any]) -> torch.fx.GraphModule:
    """Trace ``fn`` to ATen ops after Inductor's decompositions, reusing the fake mode of ``fake_args``.

    The traced nodes carry ``meta["val"]`` in the same fake mode (and shape environment) as the
    graph the arguments came from, so they can be copied into it as they are.
    """
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*fake_args)


@contextlib.contextmanager
def _no_autograd_cache() -> Iterator[None]:
    # An AOTAutograd cache hit skips the joint graph, so the pass (and its report) would not run.
    with _functorch_config.patch(enable_autograd_cache=False):
        yield


def inductor_cache_dir() -> str:
    """The directory of Inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
"""The ``torch.compile(mode=...)`` values Inductor knows."""


def mode_options(mode: Optional[str]) -> dict[str, Any]:
    """Inductor's config options for ``torch.compile(mode=mode)`` (``None``: the default mode)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; Inductor's are {', '.join(COMPILE_MODES)}")
    return dict(torch._inductor.list_mode_options(mode or "default"))


class ChainedPass(CustomGraphPass):
    """Runs a user's own ``joint_custom_pre_pass`` (one pass or a list), then ubcompile's."""

    def __init__(self, user: Any, ours: CustomGraphPass) -> None:
        self.passes = [*(user if isinstance(user, (list, tuple)) else [user]), ours]

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> Optional[Any]:
        uuids = [getattr(graph_pass, "uuid", lambda: None)() for graph_pass in self.passes]
        return None if any(u is None for u in uuids) else tuple(uuids)  # None: Inductor skips its cache


def compile_with_joint_pass(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    joint_pass: CustomGraphPass | None,
    on_backward_graph: Callable[[torch.fx.GraphModule], None],
    options: Optional[dict[str, Any]] = None,
    caches: bool = False,
) -> Any:
    """Compile ``gm`` with Inductor, running ``joint_pass`` on the AOTAutograd joint graph.

    ``joint_pass`` runs inside Inductor's partitioning step, after ATen canonicalisation and
    before Inductor's own joint-graph passes; the lazily compiled backward inherits the patch. A
    ``joint_custom_pre_pass`` the user set in Inductor's config runs first (:class:`ChainedPass`).
    ``on_backward_graph`` receives each partitioned backward graph before it is lowered.
    ``options`` are further Inductor config options (those of a ``torch.compile`` mode).
    With ``caches=False`` Inductor's FX-graph cache and the AOTAutograd cache are off: a hit would
    replay a graph that depends on process state. ``caches=True`` leaves both as the user has them
    (on by default), for a pass whose graphs are pure functions of their inputs; an AOTAutograd
    hit then skips the joint graph and the pass (:mod:`ubcompile.report_store` keeps its report).
    """

    def inner_compile(graph: torch.fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
        if kwargs.get("is_backward"):
            on_backward_graph(graph)
        return compile_fx_inner(graph, inputs, **kwargs)

    patches: dict[str, Any] = {**(options or {}), **({} if caches else {"fx_graph_cache": False})}
    if joint_pass is not None:
        user = torch._inductor.config.joint_custom_pre_pass
        patches["joint_custom_pre_pass"] = joint_pass if not user else ChainedPass(user, joint_pass)
    with contextlib.nullcontext() if caches else _no_autograd_cache():
        return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)


def compile_eager_with_joint_pass(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    joint_pass: CustomGraphPass | None,
    on_backward_graph: Callable[[torch.fx.GraphModule], None],
) -> Any:
    """Like :func:`compile_with_joint_pass`, but the partitioned graphs run eagerly (no Inductor).

    AOTAutograd traces the joint graph with Inductor's decompositions, ``joint_pass`` rewrites it
    inside the partition function, and the forward and backward graphs run op by op: the
    ``aot_eager`` reference for the Inductor-compiled result.
    """

    def partition(joint_module: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        if joint_pass is not None:
            joint_pass(joint_module.graph)
            joint_module.recompile()
        forward, backward = default_partition(joint_module, joint_inputs, **kwargs)
        on_backward_graph(backward)
        return forward, backward

    def run_eagerly(graph: torch.fx.GraphModule, _inputs: Sequence[Any]) -> Any:
        return make_boxed_func(graph.forward)

    compiler = aot_autograd(fw_compiler=run_eagerly, bw_compiler=run_eagerly, partition_fn=partition,
                            decompositions=select_decomp_table())
    with _no_autograd_cache():
        return compiler(gm, example_inputs)
