"""Inductor's caches serve sampled graphs (issue 20, item 2): a second process compiling the same
model hits AOTAutograd's cache, draws the same for the same seed and reports completely (from the
stored report); another option misses. Each run is a fresh process sharing one cache directory,
with ubcompile's op bodies eager: their compiled kernels (ubcompile.kernels) hit the same caches
and would count among the hits of the model's graphs."""

import json
import os
import subprocess
import sys

import pytest

RUN = r"""
import json, sys, torch, torch.nn as nn, ubcompile
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
x = torch.randn(64, 96)
backend = ubcompile.backend(seed=0, min_dim=16, min_speedup=0, **json.loads(sys.argv[1]))
compiled = torch.compile(model, backend=backend)
for _ in range(int(sys.argv[2])):  # the last step's gradient
    grad = torch.autograd.grad(compiled(x).square().sum(), model[0].weight)[0]
exact = torch.autograd.grad(model(x).square().sum(), model[0].weight)[0]
report = backend.report()
print(json.dumps({"hits": counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"],
                  "grad": grad.flatten()[:8].tolist(), "sampled_grad": not torch.allclose(grad, exact),
                  "table": report.table(),
                  "sampled": len(report.sampled), "backward_code": bool(report.backward_code)}))
"""


def run(options: dict, cache_dir: str, steps: int = 1) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "UBCOMPILE_EAGER_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(options), str(steps)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("inductor_cache"))


def test_a_second_process_hits_the_cache_with_the_same_draws_and_report(cache_dir):
    first, second = run({}, cache_dir), run({}, cache_dir)
    assert first["hits"] == 0 and second["hits"] > 0
    assert second["grad"] == first["grad"] and second["sampled"] == first["sampled"] > 0 and first["sampled_grad"]
    assert second["backward_code"] and second["table"] == first["table"]


def test_another_option_misses(cache_dir):
    run({}, cache_dir)
    assert run({"grad": "both"}, cache_dir)["hits"] == 0


def test_auto_hits_the_cache_with_the_same_draws_and_report(cache_dir):
    """p='auto' finds its controller through an input of the graph, not inside it: the same as a
    fixed p, a second process is served by the cache, draws alike and reports completely. Its first
    call is exact (nothing measured yet); the third is sampled."""
    options = {"p": "auto", "budget": 4.0}  # a budget that samples layer 0 from its second call
    first, second = run(options, cache_dir, steps=3), run(options, cache_dir, steps=3)
    assert first["hits"] == 0 and second["hits"] > 0 and first["sampled_grad"]
    assert second["grad"] == first["grad"] and second["sampled"] == first["sampled"] > 0
    assert second["backward_code"] and second["table"] == first["table"]
