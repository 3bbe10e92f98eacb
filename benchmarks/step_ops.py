"""ATen ops, host reads and GPU kernels per training step (issue 19): warm forwards and backwards
of a 4-layer MLP (256-512-512-512-10, batch 256; ``--model bagnet``: the experiments' BagNet at 64
channels, batch 128 of 1 x 28 x 28), counted with ``torch.profiler`` (every ATen op a
compiled step dispatches, extern kernels and the ops inside ubcompile's opaque ops included), each
step on its own: the mean, min and max over ``--steps`` steps (``p="auto"`` measures and makes its
residual bases at some steps only).

    python benchmarks/step_ops.py '{}'                # ubcompile.backend() options, a Python dict
    python benchmarks/step_ops.py exact               # exact torch.compile
    python benchmarks/step_ops.py '{}' --top 25       # and the 25 most frequent ops
    python benchmarks/step_ops.py "{'p': 'auto'}" --model bagnet --steps 100   # p="auto" on convolutions
    python benchmarks/step_ops.py '{}' --device cuda --dtype bfloat16 --sync-debug
        # on a GPU: also CUDA kernels per step, and the warm step run under
        # torch.cuda.set_sync_debug_mode("error") (any synchronizing call raises)
"""

import argparse
import ast
import collections
import pathlib
import sys

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import ubcompile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from models import BagNet  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("options", help="'exact', or ubcompile.backend options as a Python dict")
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--mode", help="torch.compile mode (e.g. reduce-overhead)")
parser.add_argument("--sync-debug", action="store_true", help="raise on any synchronizing CUDA call")
parser.add_argument("--top", type=int, default=0)
parser.add_argument("--steps", type=int, default=20, help="warm steps profiled, each on its own")
parser.add_argument("--model", choices=["mlp", "bagnet"], default="mlp")
args = parser.parse_args()

torch.manual_seed(0)
dtype = getattr(torch, args.dtype)
if args.model == "bagnet":
    model = BagNet(in_channels=1, width=64).to(args.device, dtype)
    x = torch.randn(128, 1, 28, 28, device=args.device, dtype=dtype)
else:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                          nn.ReLU(), nn.Linear(512, 10)).to(args.device, dtype)
    x = torch.randn(256, 256, device=args.device, dtype=dtype)
WARM_STEPS = 12  # p="auto" compiles its last op body (tracking the residual bases) at a site's 11th call
backend = "inductor" if args.options == "exact" else ubcompile.backend(**ast.literal_eval(args.options))
compiled = torch.compile(model, backend=backend, mode=args.mode)
for _ in range(WARM_STEPS):
    compiled(x).float().square().mean().backward()
cuda = args.device.startswith("cuda")
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
if args.sync_debug:
    torch.cuda.set_sync_debug_mode("error")
steps = []
for _ in range(args.steps):
    with profile(activities=activities) as prof:
        compiled(x).float().square().mean().backward()
    steps.append(prof.events())
if args.sync_debug:
    torch.cuda.set_sync_debug_mode(0)


def spread(per_step: list[int]) -> str:
    return f"{sum(per_step) / len(per_step):g} (min {min(per_step)}, max {max(per_step)})"


names = [[e.name for e in events if e.name.startswith("aten::")] for events in steps]
counts = [f"aten ops {spread([len(n) for n in names])}",
          f"local_scalar_dense {spread([n.count('aten::_local_scalar_dense') for n in names])}",
          f"nonzero {spread([n.count('aten::nonzero') for n in names])}"]
if cuda:
    counts.append("cuda kernels " + spread([sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
                                            for events in steps]))
if args.sync_debug:
    counts.append("no synchronizing call (sync debug mode 'error')")
print(f"{args.model} {args.options} {args.device} {args.dtype} mode={args.mode}, {args.steps} steps: " + ", ".join(counts))
if args.top:
    print(collections.Counter(name for n in names for name in n).most_common(args.top))
