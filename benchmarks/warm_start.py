"""Cold and warm start of the experiments' ViT and GPT: the first training step's time in a fresh
process, with an empty Inductor cache (cold) and with the cache the cold run left (warm), exact
``torch.compile`` against ubcompile's default backend (issue 20: sampled graphs use the FX-graph
cache). One process per measurement; prints a markdown table.

    python benchmarks/warm_start.py [--rounds 3] [--options '{"p": "auto"}']
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

STEP = r"""
import json, sys, time, torch
sys.path.insert(0, "examples")
import ubcompile
from models import GPT, ViT
torch.manual_seed(0)
name, backend_name = sys.argv[1], sys.argv[2]
if name == "vit":
    model, x = ViT(in_channels=1, image=28, patch=7, dim=64, heads=2, depth=2), torch.randn(128, 1, 28, 28)
else:
    model, x = GPT(vocab=65, dim=128, heads=4, context=64, fused=[False, False]), torch.randint(0, 65, (32, 64))
backend = "inductor" if backend_name == "exact" else ubcompile.backend(**json.loads(sys.argv[3]))
start = time.perf_counter()
torch.compile(model, backend=backend)(x).float().square().mean().backward()
print(json.dumps(time.perf_counter() - start))
"""


def first_step(model: str, backend: str, cache_dir: str, options: str) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", STEP, model, backend, options], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--options", default="{}", help="ubcompile.backend options, as JSON")
    args = ap.parse_args()
    rows = []
    for model in ("vit", "gpt"):
        times: dict[str, dict[str, list[float]]] = {b: {"cold": [], "warm": []} for b in ("exact", "ubcompile")}
        for _ in range(args.rounds):
            for backend in times:
                with tempfile.TemporaryDirectory() as cache_dir:
                    times[backend]["cold"].append(first_step(model, backend, cache_dir, args.options))
                    times[backend]["warm"].append(first_step(model, backend, cache_dir, args.options))
        med = {b: {k: statistics.median(v) for k, v in t.items()} for b, t in times.items()}
        rows.append(f"| {model} | {med['exact']['cold']:.1f} | {med['exact']['warm']:.1f} | {med['ubcompile']['cold']:.1f} "
                    f"| {med['ubcompile']['warm']:.1f} | {med['ubcompile']['warm'] / med['exact']['warm']:.2f} |")
    print("| model | exact cold s | exact warm s | ubcompile cold s | ubcompile warm s | warm vs exact warm |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
