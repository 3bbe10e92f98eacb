"""Time, FLOPs, memory and compile time of ubcompile against exact Inductor, per model, in one process.

    python benchmarks/bench.py                                   # the CPU suite: all four models
    python benchmarks/bench.py --device cuda --dtype bfloat16    # the GPU suite
    python benchmarks/bench.py --model mlp vit gpt2 resnet --p 0.25 --grad weight both
        --sketch norm uniform [--rounds 5] [--blocks N --width W --batch B --tokens T --image S]
        [--variant "grad=weight,p=0.25,axis=features"] [--compiler eager] [--csv out.csv] [--json out.json]

Models (``bench_models.py``; each a training step on ``out.square().mean()``), defaults CPU / CUDA:

- ``mlp``: 4 x Linear(4096, 4096) with ReLUs, batch 1024 / 1024.
- ``vit``: 2 ViT-B/16-sized pre-LN encoder blocks (d=768, 12 heads, MLP 3072), 197 tokens, batch 8 / 32.
- ``gpt2``: 2 GPT-2-small-sized causal blocks (d=768, 12 heads, MLP 3072), 1024 tokens, batch 1 / 8.
- ``resnet``: 2 basic blocks (2 x conv3x3, 256 channels, BatchNorm), 32x32, batch 8 / 128.
- ``cnn`` (not in the default suite): 4 x conv3x3 of 128 channels with ReLUs, 32x32, batch 32 / 256.

CPU batches are chosen so that an exact step takes about 1-3 s on a 2-core CPU. Attention is fused
SDPA, as real models write it; its backward stays exact, so only the Linear layers of vit and gpt2
are sampled. Size flags (``--blocks``/``--depth``, ``--width``, ``--batch``, ``--tokens``, ``--image``)
apply to every model given; unset, each model takes its defaults for the device.

Variants: exact ``torch.compile(backend="inductor")`` (``aot_eager`` with ``--compiler eager``),
then one ``ubcompile.backend(seed=0, ...)`` per combination of ``--grad`` x ``--sketch`` x ``--p``,
or, when ``--variant`` is given, one per ``--variant`` instead: comma-separated ``key=value`` backend
options, values read by ``ast.literal_eval`` (else taken as strings).

Method (as in the project's first benchmark): every variant is a deepcopy of one model, compiled
once; its first step is timed as compile time (Dynamo, AOTAutograd, the pass, Inductor, one run)
with every compile cache off, after a throwaway compile has paid the compiler's start-up; its
second step measures the tensors saved for backward; then each round runs one step of every
variant in turn, and times are medians over rounds. Columns:

- ``fwd/bwd/step ms``: forward, backward, and forward + backward + SGD step; ``/ exact`` ratios.
- ``bwd FLOPs``: ``backend.report().flop_ratio``, the backward GEMM FLOPs of the products the pass
  found (matmuls, convolutions; fused attention counts 0) after rewriting, over before.
- ``ideal bwd`` / ``ideal step``: the FLOP ratio of the backward / of forward + backward if every
  product the report samples ran at exactly ``p`` and nothing else changed, over all of the step's
  GEMM FLOPs (matmuls, convolutions and attention, counted by ``torch.utils.flop_counter`` on the
  meta device, where attention is the dense math path); forward GEMMs stay exact, so for a model
  of equal linear layers under ``grad="both"`` the step's ideal is ``(1 + 2p) / 3``.
- ``saved MB``: bytes of the distinct storages the forward saves for backward (parameters
  excluded), seen by ``torch.autograd.graph.saved_tensors_hooks``; a compiled graph saves its
  activations through them like eager autograd does.
- ``peak MB`` (CUDA): ``torch.cuda.max_memory_allocated`` during a step above what was allocated
  before it (activations, gradients, temporaries; the resident copies of every variant excluded).
- ``compile s``: wall time of the first forward + backward; ``pass s``: the part of it spent in the
  ubcompile pass itself (rewriting the joint graphs), the rest being Dynamo, AOTAutograd and Inductor.
  With ``--warm-bodies`` the sampled ops' bodies (:mod:`ubcompile.kernels`: compiled once per process
  for every size, and kept in Inductor's FX-graph cache across processes) are compiled first, on a
  small model of the same family: the compile a user meets for every model after the first on a
  machine. Without it, each model's first variant of each sketch also pays for them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import time
import warnings
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
import torch.compiler.config
import torch.nn as nn
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

import ubcompile
from bench_models import MODELS, SUITE, Size

AnyBackend = Union[str, ubcompile.Backend]

COMPILE_SETTINGS = (
    (torch.compiler.config, "force_disable_caches", True),
    (torch._inductor.config, "fx_graph_cache", False),
    (torch._functorch.config, "enable_autograd_cache", False),
    (torch._dynamo.config, "recompile_limit", 256),
    (torch._dynamo.config, "automatic_dynamic_shapes", False),
)
"""Every variant compiles from scratch (no FX graph, AOTAutograd or kernel cache warmed by another
variant), and Dynamo keeps one entry per variant of the same ``forward``, each with static shapes
as in a fresh process (``--warm-bodies`` compiles the same ``forward`` at other shapes first). Names missing from a torch
release are skipped."""

EXACT_BACKENDS = {"inductor": "inductor", "eager": "aot_eager"}
"""The exact reference for each ``compiler`` of the ubcompile variants."""


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """The scalar loss of every model's step."""
    return out.float().square().mean()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def saving_storages(into: dict[int, int], skip: set[int]) -> Iterator[None]:
    """Record ``{storage pointer: bytes}`` of every tensor saved for backward in ``into``, except
    the storages in ``skip``."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            into[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class Variant:
    """One compiled copy of the model with its own SGD optimizer, run one step at a time."""

    def __init__(self, name: str, model: nn.Module, backend: AnyBackend) -> None:
        self.name, self.backend = name, backend
        self.model = torch.compile(model, backend=backend)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-6)
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.times: dict[str, list[float]] = {"fwd": [], "bwd": [], "step": []}
        self.peaks: list[int] = []
        self.compile_s = 0.0
        self.saved = 0

    def step(self, x: torch.Tensor, forward_context: Optional[contextlib.AbstractContextManager] = None
             ) -> dict[str, float]:
        """One training step: its forward, backward and whole-step seconds."""
        device = x.device
        synchronize(device)
        t0 = time.perf_counter()
        with forward_context or contextlib.nullcontext():
            out = self.model(x)
        loss = loss_of(out)
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        synchronize(device)
        t3 = time.perf_counter()
        return {"fwd": t1 - t0, "bwd": t2 - t1, "step": t3 - t0}

    def prepare(self, x: torch.Tensor) -> None:
        """Compile (timed), then measure the saved tensors on a second, warm step."""
        first = self.step(x)
        self.compile_s = first["fwd"] + first["bwd"]
        storages: dict[int, int] = {}
        self.step(x, forward_context=saving_storages(storages, self.parameters))
        self.saved = sum(storages.values())

    def record(self, x: torch.Tensor) -> None:
        """One timed step; on CUDA also the peak memory it allocated above what was resident."""
        cuda = x.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(x.device)
            resident = torch.cuda.memory_allocated(x.device)
        for key, seconds in self.step(x).items():
            self.times[key].append(seconds)
        if cuda:
            self.peaks.append(torch.cuda.max_memory_allocated(x.device) - resident)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])

    @property
    def peak(self) -> Optional[int]:
        """The most CUDA memory a timed step added (None off CUDA)."""
        return max(self.peaks, default=None)


def literal(text: str) -> Any:
    """A Python literal (``0.25``, ``None``, ``True``), else the text itself (``weight``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(text: str) -> dict[str, Any]:
    """``"grad=weight,p=0.25"`` -> ``{"grad": "weight", "p": 0.25}``; a value may hold commas
    (``"p=0.5,axis=rows"``, ``"key=(1, 2)"``): items split only before ``key=``."""
    options = {}
    for item in re.split(r",\s*(?=\w+\s*=)", text.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value items separated by commas, got {item!r}")
        options[key.strip()] = literal(value.strip())
    return options


def variant_options(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The backend options of each sampled variant: ``--variant``s, else the grad x sketch x p grid."""
    if args.variant:
        return args.variant
    return [{"grad": grad, "sketch": sketch, "p": p} for grad in args.grad for sketch in args.sketch for p in args.p]


def make_backend(options: dict[str, Any], compiler: str) -> ubcompile.Backend:
    return ubcompile.backend(**{"seed": 0, "compiler": compiler, **options})


def variant_name(options: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in options.items())


def step_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Forward and backward GEMM FLOPs of one exact step, counted on the meta device."""
    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        out = meta(x.to("meta"))
        forward = counter.get_total_flops()
        loss_of(out).backward()
    return forward, counter.get_total_flops() - forward


def ideal_ratios(report: ubcompile.Report, forward: int, backward: int) -> tuple[Optional[float], Optional[float]]:
    """Backward and step GEMM FLOPs / exact if every sampled product ran at exactly its ``p``
    (None under ``p="auto"``, whose fractions change during training)."""
    if any(e.adaptive for e in report.sampled):
        return None, None
    saved = sum((1 - e.p) * e.exact_flops for e in report.sampled)
    return 1 - saved / backward, 1 - saved / (forward + backward)


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """:data:`COMPILE_SETTINGS` for the duration, restored after (without Dynamo's warning that
    they turn its profile-guided recompilation off)."""
    with contextlib.ExitStack() as stack:
        for module, name, value in COMPILE_SETTINGS:
            if hasattr(module, name):
                stack.enter_context(module.patch(**{name: value}))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
        yield


def warm_compiler(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Compile and run a tiny model once, so that the first timed compile pays no start-up cost."""
    layer = nn.Linear(8, 8).to(device=device, dtype=dtype)
    torch.compile(layer, backend=backend)(torch.randn(4, 8, device=device, dtype=dtype)).sum().backward()


def build_variants(model: nn.Module, args: argparse.Namespace) -> list[Variant]:
    exact = EXACT_BACKENDS[args.compiler]
    variants = [Variant(f"exact {exact}", copy.deepcopy(model), exact)]
    for options in variant_options(args):
        variants.append(Variant(variant_name(options), copy.deepcopy(model), make_backend(options, args.compiler)))
    return variants


def ratio(value: Optional[float], exact: Optional[float]) -> Optional[float]:
    return value / exact if value is not None and exact else None


def row(model: str, v: Variant, exact: Variant, flops: tuple[int, int]) -> dict[str, Any]:
    """One table row: medians, ratios to ``exact``, FLOP ratios, memory and compile time."""
    report = v.backend.report() if isinstance(v.backend, ubcompile.Backend) else None
    ideal_bwd, ideal_step = ideal_ratios(report, *flops) if report is not None else (1.0, 1.0)
    times = {f"{k}_ms": 1e3 * v.median(k) for k in ("fwd", "bwd", "step")}
    return {
        "model": model, "variant": v.name, **times,
        **{f"{k}_ratio": ratio(v.median(k), exact.median(k)) for k in ("fwd", "bwd", "step")},
        "bwd_flop_ratio": report.flop_ratio if report is not None else 1.0,
        "ideal_bwd": ideal_bwd, "ideal_step": ideal_step,
        "saved_mb": v.saved / 2**20, "saved_ratio": ratio(v.saved, exact.saved),
        "peak_mb": v.peak / 2**20 if v.peak is not None else None, "peak_ratio": ratio(v.peak, exact.peak),
        "compile_s": v.compile_s, "compile_ratio": ratio(v.compile_s, exact.compile_s),
        "pass_s": sum(g.pass_seconds for g in v.backend.graphs) if report is not None else None,
    }


def model_size(name: str, args: argparse.Namespace, device: torch.device) -> Size:
    """The model's default size for the device, with the size flags that were given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Size) if getattr(args, f.name) is not None}
    return dataclasses.replace(MODELS[name].defaults[device.type], **given)


def warm_size(size: Size) -> Size:
    """A small size of the same family, whose sampled products call every op body the benchmarked
    size calls, with shapes unlike any benchmarked size so that no model kernel is shared: width
    128 and 2 blocks (propagated gradients, whose operands' layout differs from a weight gradient's,
    and the residual sketch of ``p="auto"``, offered from about 128 features on 256 rows), 256 rows
    per product, and at least 16 images (4 kept at ``p=0.25``: a body first called with one kept
    index is compiled for that count alone)."""
    if size.tokens:
        return Size(128, 2, 4, tokens=min(size.tokens, 64))
    if size.image:
        return Size(128, 2, 16, image=min(size.image, 8))
    return Size(128, 2, 256)


def warm_bodies(name: str, size: Size, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """One step of every sampled variant on :func:`warm_size`, each with a backend of its own: the
    ops' bodies are compiled, and no benchmarked backend's report sees the graphs. The cost rule
    is off there (``min_speedup=0``): it would keep the small size's products exact, and compile
    no body."""
    small = warm_size(size)
    model = MODELS[name].build(small).to(device=device, dtype=dtype)
    x = torch.randn(MODELS[name].input_shape(small), device=device, dtype=dtype)
    for options in variant_options(args):
        backend = make_backend({**options, "min_speedup": 0}, args.compiler)
        loss_of(torch.compile(copy.deepcopy(model), backend=backend)(x)).backward()


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
              ) -> tuple[Size, list[dict[str, Any]]]:
    """Benchmark every variant on model ``name``: its size and one row per variant, exact first."""
    torch._dynamo.reset()
    spec, size = MODELS[name], model_size(name, args, device)
    if args.warm_bodies:
        warm_bodies(name, size, args, device, dtype)
    torch.manual_seed(0)
    model = spec.build(size).to(device=device, dtype=dtype)
    x = torch.randn(spec.input_shape(size), device=device, dtype=dtype)
    flops = step_flops(model, x)
    variants = build_variants(model, args)
    for v in variants:
        v.prepare(x)
    for _ in range(args.rounds):
        for v in variants:
            v.record(x)
    return size, [row(name, v, variants[0], flops) for v in variants]


COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("variant", "variant", str),
    ("fwd_ms", "fwd ms", "{:.1f}".format), ("bwd_ms", "bwd ms", "{:.1f}".format),
    ("step_ms", "step ms", "{:.1f}".format),
    ("bwd_ratio", "bwd / exact", "{:.3f}".format), ("step_ratio", "step / exact", "{:.3f}".format),
    ("bwd_flop_ratio", "bwd FLOPs", "{:.3f}".format),
    ("ideal_bwd", "ideal bwd", "{:.3f}".format), ("ideal_step", "ideal step", "{:.3f}".format),
    ("saved_mb", "saved MB", "{:.1f}".format), ("saved_ratio", "saved / exact", "{:.3f}".format),
    ("peak_mb", "peak MB", "{:.1f}".format), ("peak_ratio", "peak / exact", "{:.3f}".format),
    ("compile_s", "compile s", "{:.1f}".format), ("compile_ratio", "compile / exact", "{:.2f}".format),
    ("pass_s", "pass s", "{:.2f}".format),
]
"""The markdown table: row key, header, format. A missing value (None) shows as ``-``; columns
missing in every row (peak memory off CUDA) are left out."""


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(r[c[0]] is not None for r in rows)]
    table = [["-" if r[key] is None else fmt(r[key]) for key, _, fmt in columns] for r in rows]
    return tabulate(table, headers=[header for _, header, _ in columns], tablefmt="github", disable_numparse=True)


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else what ``platform`` says."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device, dtype: torch.dtype) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
            f"{gpu}, {device.type}, {str(dtype).removeprefix('torch.')}, {datetime.date.today().isoformat()}")


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=SUITE)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--p", type=float, nargs="+", default=[0.25])
    parser.add_argument("--grad", nargs="+", choices=ubcompile.GRAD_MODES, default=["weight", "both"])
    parser.add_argument("--sketch", nargs="+", choices=ubcompile.SKETCHES, default=["norm", "uniform"])
    parser.add_argument("--variant", type=parse_variant, action="append",
                        help="backend options key=value,...; repeatable; replaces the --grad/--sketch/--p grid")
    parser.add_argument("--compiler", choices=list(EXACT_BACKENDS), default="inductor",
                        help="compile with Inductor, or run the graphs op by op (exact reference: aot_eager)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm-bodies", action="store_true",
                        help="compile the sampled ops' bodies before timing the compiles (see compile s)")
    parser.add_argument("--blocks", "--depth", type=int, help="blocks (mlp: linear layers)")
    parser.add_argument("--width", type=int, help="features (mlp, vit, gpt2) or channels (resnet, cnn)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--tokens", type=int, help="sequence length of vit and gpt2")
    parser.add_argument("--image", type=int, help="image side of resnet and cnn")
    parser.add_argument("--csv", help="write all rows to this CSV file")
    parser.add_argument("--json", help="write the machine, arguments and rows to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for options in args.variant or []:  # invalid options fail here, before any model is built
        try:
            make_backend(options, args.compiler)
        except (TypeError, ValueError) as e:
            parser.error(f"--variant {variant_name(options)}: {e}")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Run the benchmark, print one table per model; returns every row."""
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    header = machine(device, dtype)
    print(f"{header}; medians of {args.rounds} interleaved rounds\n")
    rows: list[dict[str, Any]] = []
    with compile_settings():
        warm_compiler(EXACT_BACKENDS[args.compiler], device, dtype)
        for name in args.model:
            size, model_rows = run_model(name, args, device, dtype)
            print(f"{name}: {MODELS[name].describe(size)}\n\n{markdown(model_rows)}\n", flush=True)
            rows += model_rows
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
