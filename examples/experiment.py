"""The common harness of the training examples: one command line, one training loop, one JSON record.

Each example script describes a :class:`Task` (a model, its batches, its evaluation) and calls
:func:`main` with the exact run's optimizer, learning rate and epochs as defaults. A run trains
``torch.compile(model, backend=B)`` with SGD (momentum 0.9) or Adam, where ``B`` is Inductor (``--exact``) or
``ubcompile.backend(p, grad, sketch, axis, seed)``. Every run with the same ``--seed`` starts from
the same weights and sees the same batches; the sampler has its own generator, so the exact and the
sampled runs differ only by the sketch.

A run's record (printed, and written with ``--json``) holds its curve: at step 0 and after every
``1 / --evals-per-epoch`` of an epoch, the step, the epoch, the training time so far (forward,
backward and optimizer step, measured; evaluation and compilation excluded), the backward GEMM and
convolution FLOPs so far (from the backend's report), the test accuracy and the mean training loss.
Evaluation runs the uncompiled model (the same function: the models have no dropout or batch norm),
which spares each run an inference compile.
A run whose loss stops being finite is recorded as diverged, with the step.

``--vcas`` trains the same model, batches, optimizer and seed with VCAS instead (``examples/vcas.py``:
its controller measures every ``min(100, steps // 50)`` steps, at least 1, on batches of its own),
eagerly; ``--vcas-tau`` sets the variance it allows (both of its rules). Its record has the same
fields, the label ``vcas`` (``vcas tau=T`` off the default), the backward FLOPs of every pass
(measurements included) and the controller's timeline under ``vcas``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ubcompile
import vcas
from ubcompile.auto import LEVELS, RESIDUAL_RANK, AutoController
from ubcompile.config import AXES, BUDGET_SCALES, COMPILERS, GRAD_MODES, SKETCHES, SamplingConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Task:
    """What an example trains. ``build`` is called right after ``torch.manual_seed(seed)``;
    ``batches(generator)`` yields one epoch of ``steps_per_epoch`` equal-shaped batches on the
    run's device, in an order drawn from ``generator``; ``evaluate(model)`` returns the test
    accuracy in percent (next-character accuracy for a language model). The learning rate and
    the epochs are command-line defaults of the script."""

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], Iterable[Batch]]
    steps_per_epoch: int
    evaluate: Callable[[Callable[[torch.Tensor], torch.Tensor]], float]
    example: Batch  # one training batch, for counting FLOPs


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position: ``[batch, classes]`` or ``[batch, tokens, vocab]`` logits."""
    return F.cross_entropy(out.flatten(0, -2), target.flatten())


def chunked_accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     chunk: int) -> float:
    """Percent of argmax predictions equal to ``y``, in chunks of ``chunk`` rows (``len(x)`` must be
    a multiple, so every chunk has the shape the evaluation graph was compiled for)."""
    if len(x) % chunk:
        raise ValueError(f"{len(x)} evaluation rows are not a multiple of the chunk size {chunk}")
    with torch.no_grad():
        correct = sum((model(xc).argmax(-1) == yc).sum().item() for xc, yc in zip(x.split(chunk), y.split(chunk)))
    return 100.0 * correct / y.numel()


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr)


def add_common_arguments(ap: argparse.ArgumentParser, task_lr: float, task_epochs: int, task_optimizer: str) -> None:
    exclusive = ap.add_mutually_exclusive_group()
    exclusive.add_argument("--exact", action="store_true", help="exact gradients: plain torch.compile (Inductor)")
    exclusive.add_argument("--vcas", action="store_true",
                           help="VCAS (examples/vcas.py) at its defaults, eagerly, instead of ubcompile")
    ap.add_argument("--vcas-tau", type=float, default=vcas.VCASConfig.act_tau,
                    help="with --vcas: the variance VCAS allows, for both its activation and its weight rule "
                         "(act_var_tau and w_var_tau), relative to the SGD variance; larger samples harder")
    ap.add_argument("--p", type=keep_fraction, default=0.25,
                    help="keep fraction of the sampled gradient products, or 'auto' (chosen per layer from "
                         "measured variance; grad weight, norm sketch)")
    ap.add_argument("--budget", type=float, default=SamplingConfig.budget,
                    help="with --p auto: added variance allowed, summed over the layers, as a fraction of their "
                         "summed SGD variance")
    ap.add_argument("--budget-scale", choices=BUDGET_SCALES, default=SamplingConfig.budget_scale,
                    help="with --p auto: the layers' variances summed as they are (global) or each over its "
                         "layer's squared gradient norm (layer)")
    ap.add_argument("--sketch", choices=SKETCHES, default="norm")
    ap.add_argument("--grad", choices=GRAD_MODES, default="weight")
    ap.add_argument("--axis", choices=AXES, default=None, help="default: the grad mode's default axis")
    ap.add_argument("--min-dim", type=int, default=64, help="products with a smaller dimension stay exact")
    ap.add_argument("--min-speedup", type=float, default=0.0,
                    help="the backend's cost rule (SamplingConfig.min_speedup). Default 0: no rule, every "
                         "product the other rules allow is sampled, as in every recorded experiment (they "
                         "measure the estimators); 1 is the backend's default, products sampling would slow "
                         "down stay exact")
    ap.add_argument("--compiler", choices=COMPILERS, default="inductor",
                    help="eager: the same graphs run op by op (aot_eager for --exact), no Inductor compile")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=task_optimizer,
                    help="sgd: SGD with momentum 0.9; adam: Adam (betas 0.9, 0.999)")
    ap.add_argument("--lr", type=float, default=task_lr)
    ap.add_argument("--epochs", type=float, default=task_epochs, help="may be fractional")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, the batch order and the sampler")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--evals-per-epoch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", metavar="PATH", help="write the run's record as JSON")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")


def keep_fraction(text: str) -> float | str:
    return text if text == "auto" else float(text)


def parse_args(argv: Optional[list[str]], doc: str, task_lr: float, task_epochs: int, task_optimizer: str = "sgd",
               add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, task_lr, task_epochs, task_optimizer)
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    if args.vcas and ap.parse_args(argv, argparse.Namespace(p=None)).p is not None:  # --p given
        ap.error("argument --p: not allowed with argument --vcas")
    if not args.vcas and args.vcas_tau != vcas.VCASConfig.act_tau:
        ap.error("argument --vcas-tau: only with argument --vcas")
    return args


def auto_label(budget: float, scale: str) -> str:
    """The label of a ``p="auto"`` run: its budget, and its ``budget_scale`` unless ``"global"`` (the
    only scale before 2026-12-04, whose records name none)."""
    return f"auto budget={budget:g}" + ("" if scale == "global" else f" {scale}")


def label(args: argparse.Namespace) -> str:
    if args.exact:
        return "exact"
    if args.vcas:
        return "vcas" if args.vcas_tau == vcas.VCASConfig.act_tau else f"vcas tau={args.vcas_tau:g}"
    rule = f" min_speedup={args.min_speedup:g}" if args.min_speedup else ""  # no rule in every earlier record
    if args.p == "auto":
        return auto_label(args.budget, args.budget_scale) + ("" if args.grad == "weight" else f" grad={args.grad}") + rule
    return f"{args.grad}:{args.sketch} p={args.p:g}" + rule


def make_backend(args: argparse.Namespace) -> Any:
    if args.exact:
        return "inductor" if args.compiler == "inductor" else "aot_eager"
    return ubcompile.backend(p=args.p, grad=args.grad, sketch=args.sketch, axis=args.axis, seed=args.seed,
                             min_dim=args.min_dim, min_speedup=args.min_speedup, compiler=args.compiler, budget=args.budget,
                             budget_scale=args.budget_scale)


def exact_backward_flops(task: Task, device: torch.device) -> int:
    """Backward GEMM + convolution FLOPs of one exact training step: the report's count of every
    gradient product the pass finds (traced without Inductor; nothing is sampled at ``p=1``)."""
    torch.manual_seed(0)
    report = ubcompile.explain(task.build().to(device), task.example[0], p=1.0, compiler="eager",
                               loss_fn=lambda out: loss_fn(out, task.example[1]))
    return report.exact_flops


def controller(backend: Any) -> Optional[AutoController]:
    """The ``p="auto"`` controller of a ubcompile backend; None for exact runs and fixed ``p``."""
    return getattr(getattr(backend, "sampler", None), "auto", None)


def auto_flops(backend: Any) -> float:
    """GEMM FLOPs spent so far by the products whose fraction ``p="auto"`` chooses (0 otherwise)."""
    auto = controller(backend)
    return 0.0 if auto is None else auto.spent_flops


def auto_record(backend: Any) -> Optional[dict[str, Any]]:
    """Under ``p="auto"``: per controlled product, the fractions chosen over training and their use."""
    auto = controller(backend)
    if auto is None:
        return None
    return {"budget": auto.budget, "measure_every": auto.measure_every, "levels": list(LEVELS),
            "rank": RESIDUAL_RANK,
            "flop_ratio": auto.spent_flops / auto.exact_flops if auto.exact_flops else 1.0,
            "propagation": [dataclasses.asdict(g) for g in auto.propagation.values()],
            "sites": [{"module": s.module, "family": s.family, "shape": list(s.shape), "group": s.group, "calls": s.calls,
                       "options": [o.label for o in s.options], "uses": s.uses, "spikes": s.spikes,
                       "timeline": s.timeline,
                       "measurements": [dataclasses.asdict(m) for m in s.measurements]} for s in auto.sites]}


def environment(device: torch.device) -> dict[str, Any]:
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def run(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """Train one run of ``task`` as ``args`` say; return its record (see the module docstring)."""
    t_start = time.perf_counter()
    total_steps = round(args.epochs * task.steps_per_epoch)
    if total_steps < 1:
        raise ValueError(f"{args.epochs:g} epochs of {task.steps_per_epoch} steps is less than one step: "
                         "raise --epochs, or lower --batch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch._dynamo.reset()
    vcas_flops = exact_backward_flops(task, device) if args.vcas else 0.0
    torch.manual_seed(args.seed)
    model = task.build().to(device)
    controller_vcas, measure_batches = None, None
    if args.vcas:
        every = max(1, min(vcas.VCASConfig.every, total_steps // 50))
        vcas_config = vcas.VCASConfig(every=every, act_tau=args.vcas_tau, w_tau=args.vcas_tau)
        controller_vcas = vcas.wrap(model, config=vcas_config, exact_flops=vcas_flops, seed=args.seed)
        measure_gen = torch.Generator().manual_seed(args.seed + 1)
        measure_batches = itertools.chain.from_iterable(task.batches(measure_gen) for _ in itertools.count())
    backend = None if args.vcas else make_backend(args)
    compiled = model if args.vcas else torch.compile(model, backend=backend)
    opt = make_optimizer(args.optimizer, model.parameters(), args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    eval_every = max(1, task.steps_per_epoch // args.evals_per_epoch)

    times: list[float] = []
    losses: list[float] = []
    curve = [{"step": 0, "acc": task.evaluate(model), "loss": None, "auto_gflop": 0.0}]
    diverged_step: Optional[int] = None
    bar = tqdm(total=total_steps, desc=f"{task.name} {label(args)} seed {args.seed}", leave=False,
               disable=not args.progress, dynamic_ncols=True)
    while len(times) < total_steps and diverged_step is None:
        for x, y in task.batches(generator):
            t0 = time.perf_counter()
            if controller_vcas is not None:
                controller_vcas.step(lambda batch: loss_fn(model(batch[0]), batch[1]), measure_batches)
            loss = loss_fn(compiled(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()  # also waits for the device
            times.append(time.perf_counter() - t0)
            losses.append(value)
            bar.update()
            if not math.isfinite(value):
                diverged_step = len(times)
                break
            if len(times) % eval_every == 0 or len(times) == total_steps:
                recent = losses[-eval_every:]
                spent = controller_vcas.spent_flops if controller_vcas else auto_flops(backend)
                curve.append({"step": len(times), "acc": task.evaluate(model), "loss": sum(recent) / len(recent),
                              "auto_gflop": spent / 1e9})
                bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", acc=f"{curve[-1]['acc']:.2f}")
            if len(times) == total_steps:
                break
    bar.close()

    report = None if args.exact or args.vcas else backend.report()
    exact_flops = exact_backward_flops(task, device) if args.exact else vcas_flops if args.vcas else report.exact_flops
    # p="auto" products (or every VCAS pass): the controller's count of what they cost, added per curve point below
    static_flops = (exact_flops if args.exact else 0.0 if args.vcas
                    else sum(e.sampled_flops for e in report.entries if not e.adaptive))
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    cumulative = [0.0]
    for t in [steady] + times[1:]:  # the first step's time is mostly compilation: counted as a median step
        cumulative.append(cumulative[-1] + t)
    for point in curve:
        point["epoch"] = point["step"] / task.steps_per_epoch
        point["time_s"] = cumulative[point["step"]]
        point["bwd_gflop"] = point["step"] * static_flops / 1e9 + point.pop("auto_gflop")
    sampled_flops = curve[-1]["bwd_gflop"] * 1e9 / max(1, curve[-1]["step"])
    finished = diverged_step is None
    sampler_config = not (args.exact or args.vcas)
    return {
        "task": task.name, "label": label(args),
        "config": {"exact": args.exact, "p": args.p if sampler_config else None, "budget": args.budget,
                   "budget_scale": args.budget_scale,
                   "grad": args.grad if sampler_config else None, "sketch": args.sketch if sampler_config else None,
                   "axis": backend.config.axis if sampler_config else None,
                   "compiler": "eager" if args.vcas else args.compiler, "optimizer": args.optimizer, "lr": args.lr,
                   "epochs": args.epochs, "seed": args.seed, "device": str(device),
                   **({"min_speedup": args.min_speedup} if sampler_config and args.min_speedup else {}),
                   **({"vcas": True, "vcas_tau": args.vcas_tau} if args.vcas else {})},
        "status": "ok" if finished else "diverged", "diverged_step": diverged_step,
        "final_acc": curve[-1]["acc"] if finished else None,
        "steps_per_epoch": task.steps_per_epoch, "curve": curve,
        "bwd_gflop_per_step": {"exact": exact_flops / 1e9, "sampled": sampled_flops / 1e9},
        "auto": auto_record(backend),
        **({"vcas": controller_vcas.record()} if args.vcas else {}),
        "median_step_ms": steady * 1e3, "compile_s": times[0] - steady,
        "wall_s": time.perf_counter() - t_start, "env": environment(device),
    }


def summary(record: dict[str, Any]) -> str:
    flops = record["bwd_gflop_per_step"]
    result = (f"final test acc {record['final_acc']:.2f}%" if record["status"] == "ok"
              else f"diverged at step {record['diverged_step']}")
    return (f"{record['task']} {record['label']} lr {record['config']['lr']:g} seed {record['config']['seed']}: "
            f"{result}; backward FLOPs {flops['sampled'] / flops['exact']:.3f} of exact; "
            f"median step {record['median_step_ms']:.1f} ms; compile {record['compile_s']:.1f} s; "
            f"wall {record['wall_s']:.1f} s")


def main(build_task: Callable[[argparse.Namespace], Task], doc: str, lr: float, epochs: int, optimizer: str,
         add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> None:
    """The command line of an example: parse, build the task, train one run, print and save it."""
    args = parse_args(None, doc, lr, epochs, optimizer, add_arguments)
    record = run(build_task(args), args)
    print(summary(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
