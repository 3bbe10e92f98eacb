"""Forward, backward and step time of exact Inductor vs ubcompile on a wide MLP or CNN, in one process.

Every variant is its own copy of the same model, compiled once; the timed iterations are
interleaved (one step of each variant per round) and summarised by medians, so slow drift of the
machine hits all variants alike. Ratios are against exact ``torch.compile(backend="inductor")``.

    python benchmarks/bench_mlp.py [--width 4096] [--depth 4] [--batch 1024] [--rounds 7]
        [--p 1 0.5 0.25 0.1] [--grad weight both] [--sketch uniform] [--json out.json]
        [--model cnn --image 32]   # depth 3x3 convolutions of width channels on image x image
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn as nn
from tabulate import tabulate

import ubcompile


def make_model(kind: str, width: int, depth: int) -> nn.Sequential:
    """``depth`` layers of ``width`` features (linear) or channels (3x3 convolution), ReLUs between."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(width, width) if kind == "mlp" else nn.Conv2d(width, width, 3, padding=1))
    return nn.Sequential(*layers)


class Variant:
    """One compiled copy of the model with its own optimizer, timed one step at a time."""

    def __init__(self, name: str, grad: str, p: float, model: nn.Module, backend: Any) -> None:
        self.name, self.grad, self.p = name, grad, p
        self.backend = backend
        self.model = torch.compile(model, backend=backend)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-6)
        self.times: dict[str, list[float]] = {"fwd": [], "bwd": [], "step": []}

    def step(self, x: torch.Tensor, record: bool) -> None:
        t0 = time.perf_counter()
        loss = self.model(x).square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if record:
            for key, dt in (("fwd", t1 - t0), ("bwd", t2 - t1), ("step", t3 - t0)):
                self.times[key].append(dt)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])


def ideal_bwd(grad: str, p: float, depth: int) -> float:
    """Backward GEMM (or convolution) FLOPs / exact when every layer is sampled (the first has no
    grad_input product)."""
    sampled = {"weight": depth, "input": depth - 1, "both": 2 * depth - 1}[grad]
    gemms = 2 * depth - 1
    return (sampled * p + gemms - sampled) / gemms


def build(args: argparse.Namespace) -> list[Variant]:
    base = make_model(args.model, args.width, args.depth)
    variants = [Variant("exact inductor", "-", 1.0, copy.deepcopy(base), "inductor")]
    for sketch in args.sketch:
        for grad in args.grad:
            for p in args.p:
                backend = ubcompile.backend(p=p, grad=grad, sketch=sketch, seed=0)
                name = f"{sketch} {grad} p={p:g}"
                variants.append(Variant(name, grad, p, copy.deepcopy(base), backend))
    return variants


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch._dynamo.config.cache_size_limit = 64  # one entry per variant of the same forward
    shape = (args.batch, args.width) if args.model == "mlp" else (args.batch, args.width, args.image, args.image)
    x = torch.randn(*shape)
    variants = build(args)
    for v in variants:  # compile and warm up
        for _ in range(2):
            v.step(x, record=False)
    for _ in range(args.rounds):
        for v in variants:
            v.step(x, record=True)
    exact = variants[0]
    rows = []
    for v in variants:
        report = v.backend.report() if isinstance(v.backend, ubcompile.Backend) else None
        rows.append({
            "variant": v.name, "grad": v.grad, "p": v.p,
            **{f"{k}_ms": 1e3 * v.median(k) for k in ("fwd", "bwd", "step")},
            **{f"{k}_ratio": v.median(k) / exact.median(k) for k in ("fwd", "bwd", "step")},
            "bwd_flop_ratio": report.flop_ratio if report else 1.0,
            "ideal_bwd": 1.0 if v.grad == "-" else ideal_bwd(v.grad, v.p, args.depth),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    headers = ["variant", "fwd ms", "bwd ms", "step ms", "bwd / exact", "step / exact",
               "bwd GEMM FLOPs / exact", "ideal bwd"]
    table = [[r["variant"], f"{r['fwd_ms']:.0f}", f"{r['bwd_ms']:.0f}", f"{r['step_ms']:.0f}",
              f"{r['bwd_ratio']:.3f}", f"{r['step_ratio']:.3f}", f"{r['bwd_flop_ratio']:.3f}",
              f"{r['ideal_bwd']:.3f}"] for r in rows]
    return tabulate(table, headers=headers, tablefmt="github")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--p", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--grad", nargs="+", default=["weight", "both"], choices=ubcompile.GRAD_MODES)
    parser.add_argument("--sketch", nargs="+", default=["uniform"], choices=ubcompile.SKETCHES)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--image", type=int, default=32, help="image side for --model cnn")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = run(args)
    size = f"{args.width}" if args.model == "mlp" else f"{args.width} channels, 3x3, {args.image}x{args.image}"
    print(f"{args.model.upper()} {args.depth} x {size}, batch {args.batch}, fp32; {machine()}; "
          f"medians of {args.rounds} interleaved rounds")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
