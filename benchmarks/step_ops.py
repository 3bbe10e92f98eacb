"""ATen ops and host reads per training step (issue 19): one warm forward and backward of a 4-layer
MLP (256-512-512-512-10, batch 256), counted with ``torch.profiler`` (CPU activity: every ATen op
a compiled step dispatches, extern kernels and the ops inside ubcompile's opaque ops included).

    python benchmarks/step_ops.py '{}'            # ubcompile.backend() options, as a Python dict
    python benchmarks/step_ops.py '"exact"'       # exact torch.compile
    python benchmarks/step_ops.py '{}' v          # and the 25 most frequent ops
"""

import torch, torch.nn as nn, ubcompile, sys, collections
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256,512), nn.ReLU(), nn.Linear(512,512), nn.ReLU(), nn.Linear(512,512), nn.ReLU(), nn.Linear(512,10))
x = torch.randn(256, 256)
opts = eval(sys.argv[1]) if len(sys.argv) > 1 else {}
be = "inductor" if opts == "exact" else ubcompile.backend(**opts)
c = torch.compile(model, backend=be)
for _ in range(3): c(x).square().mean().backward()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    c(x).square().mean().backward()
names = [e.name for e in prof.events() if e.name.startswith("aten::")]
print("aten ops", len(names), "local_scalar_dense", names.count("aten::_local_scalar_dense"), "nonzero", names.count("aten::nonzero"))
if len(sys.argv) > 2: print(collections.Counter(names).most_common(25))
