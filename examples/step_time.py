"""Training-step time of the sweep's models, exact against sampled, measured quietly in one process.

    python examples/step_time.py [--models mlp bagnet vit gpt] [--p 0.25] [--rounds 5] [--steps 20] [--configs p=auto]
        [--wide] [--min-speedup 1] [--warmup 50]

The sweep (``examples/sweep.py``) times every run while another run occupies the second core, so
its step times carry that load's noise. This script compiles, per model, exact, the four
``grad`` x ``sketch`` configurations of the sweep at one ``p`` and ``p="auto"``, each on its own copy of the same
initial weights, then runs ``--rounds`` rounds; in each round every configuration does ``--steps``
training steps (forward, backward, optimizer) on the same batch, and its median step time over
exact's in the same round is one sample of the ratio. One thread, as each sweep run has. The table
gives the median ratio over rounds and its range; ``OUT/step_time.json`` keeps the raw times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable, Optional

import torch

import experiment
import sweep

Step = Callable[[], float]


def make_step(model_name: str, config: dict[str, Any], size: Optional[str] = None) -> Step:
    """A compiled training step of the sweep's model (at ``size``: ``"wide"`` for :data:`sweep.WIDE`)
    under ``config``; the first call compiles."""
    args = sweep.parse({"model": model_name, "size": size, **config})
    task = sweep.task(model_name, size)
    torch.manual_seed(0)
    model = task.build()
    compiled = torch.compile(model, backend=experiment.make_backend(args))
    opt = experiment.make_optimizer(args.optimizer, model.parameters(), args.lr)
    x, y = task.example

    def step() -> float:
        t0 = time.perf_counter()
        loss = experiment.loss_fn(compiled(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        return time.perf_counter() - t0

    step()
    return step


def measure(model_name: str, p: float, rounds: int, steps: int, only: Optional[list[str]] = None,
            size: Optional[str] = None, min_speedup: float = 0.0, warmup: int = 0) -> dict[str, Any]:
    lr = sweep.importlib.import_module(sweep.MODELS[model_name][0]).LR
    configs = {"exact": {"exact": True}} | {f"{g}:{s} p={p:g}": {"grad": g, "sketch": s, "p": p}
                                           for g in sweep.GRADS for s in sweep.SKETCHES}
    configs["p=auto"] = {"p": "auto", "budget": sweep.SamplingConfig.budget,
                         "budget_scale": sweep.SamplingConfig.budget_scale}
    configs["p=auto grad=both"] = {**configs["p=auto"], "grad": "both"}
    if only is not None:
        unknown = set(only) - set(configs)
        if unknown:
            raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {list(configs)}")
        configs = {name: c for name, c in configs.items() if name == "exact" or name in only}
    torch._dynamo.reset()
    fns = {name: make_step(model_name, {"lr": lr, "seed": 0, "min_speedup": min_speedup, **c}, size)
           for name, c in configs.items()}
    for fn in fns.values():  # p="auto" measures every few calls early on, then every measure_every
        for _ in range(warmup):
            fn()
    medians: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(statistics.median(fn() for _ in range(steps)))
    ratios = {name: sorted(m / e for m, e in zip(medians[name], medians["exact"])) for name in fns}
    return {"model": model_name, "size": size, "p": p, "min_speedup": min_speedup, "warmup": warmup, "median_step_s": medians, "ratio_to_exact": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(sweep.MODELS), default=list(sweep.MODELS))
    ap.add_argument("--p", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", nargs="+", help="time only these besides exact (e.g. 'p=auto' 'weight:norm p=0.25')")
    ap.add_argument("--min-speedup", type=float, default=0.0,
                    help="the backend's cost rule for every sampled run: 0 (default) samples every product, "
                         "as the experiments do; 1 is the backend's default")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed steps of every configuration before the rounds: p='auto' measures after "
                         "calls 0, 5, 15, 35, 75, then every measure_every (50), so its first steps are not "
                         "its typical ones")
    ap.add_argument("--wide", action="store_true", help="the realistic widths of sweep.WIDE (vit, gpt, bagnet)")
    ap.add_argument("--out", default=str(sweep.ROOT / "docs" / "experiments"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    size = "wide" if args.wide else None
    results = [measure(m, args.p, args.rounds, args.steps, args.configs, size, args.min_speedup, args.warmup)
               for m in args.models]
    rows = ["| model | run | step time vs exact, median (range) over rounds | exact step ms |", "|---|---|---|---|"]
    for r in results:
        exact_ms = statistics.median(r["median_step_s"]["exact"]) * 1e3
        for name, ratios in r["ratio_to_exact"].items():
            if name != "exact":
                rows.append(f"| {r['model']} | {name} | {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) "
                            f"| {exact_ms:.1f} |")
    table = "\n".join(rows) + "\n"
    print(table)
    env = experiment.environment(torch.device("cpu"))
    with open(f"{args.out}/step_time.json", "w") as f:
        json.dump({"args": vars(args), "env": env, "results": results, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
