"""The paper's experiments on CPU: exact against sampled training of four models, in one sweep.

    python examples/sweep.py [--grid main|auto|memory] [--models mlp bagnet vit gpt] [--workers 2]
        [--out docs/experiments]

Per model (sizes in :data:`MODELS`), at the exact run's learning rate, seeds 0 and 1: exact, and
every ``grad`` in {weight, both} x ``sketch`` in {uniform, norm} x ``p`` in {0.5, 0.25, 0.1}. At a
quarter of that learning rate, seed 0: exact and the four ``p = 0.25`` configurations. Sampled runs
train twice exact's epochs (:data:`SAMPLED_EPOCH_FACTOR`). Each run's
record (see ``examples/experiment.py``) is appended to ``OUT/runs.jsonl`` as it finishes; a
configuration already there is skipped, so an interrupted sweep resumes where it stopped.

``--grid auto`` runs ``p="auto"`` instead (:func:`auto_grid`, into ``auto_runs.jsonl``),
``--grid auto-confirm`` the default budget on fresh seeds (:func:`confirm_grid`, into
``auto_confirm_runs.jsonl``), ``--grid wide`` exact against the default budget at realistic widths
(:data:`WIDE`, :func:`wide_grid`, into ``wide_runs.jsonl``; ``--grid wide-stable`` the GPT at a
learning rate its exact training survives, ``--grid wide-vcas`` VCAS on the GPT's runs there and on the
ViT's ``wide-layer`` runs, ``--grid wide-vcas-matched`` VCAS at the ``tau`` that matches ``p="auto"``'s
backward FLOPs on each, :data:`MATCHED_VCAS_TAU`; ``--grid wide-timed`` ``p="auto"`` there with the
cost rule on, :func:`wide_timed_grid`; ``--grid wide-conv`` the BagNet at 64 channels, exact and
``p="auto"`` with its default options, :func:`wide_conv_grid`; ``--grid wide-conv-reads`` the same again,
into ``wide_conv_reads_runs.jsonl``, after the conv cost models counted what the op reads), ``--grid vcas`` VCAS on the confirmation
seeds (:func:`vcas_grid`, into ``vcas_runs.jsonl``; ``--grid vcas-matched`` at the ``tau`` that matches
``p="auto"``'s backward FLOPs there, :data:`MATCHED_VCAS_TAU_CONFIRM`; ``--grid vcas-propagated`` at those
that match the MLP's ``grad="both"`` runs, :data:`MATCHED_VCAS_TAU_PROPAGATED`), ``--grid layer-scale`` ``p="auto"``
with each layer's variance over its own gradient (:func:`layer_scale_grid`, into
``layer_scale_runs.jsonl``; ``--grid timed`` the same on the MLP with the cost rule on, :func:`timed_grid`;
``--grid propagated`` that with ``grad="both"``, :func:`propagated_grid`, into ``propagated_runs.jsonl``;
``--grid propagated-long`` for 10 epochs, into ``propagated_long_runs.jsonl``) and ``--grid memory`` the memory-saving activation sketch against the norm sketch (:func:`memory_grid`,
into ``memory_runs.jsonl``), both at exact's epochs.

Runs go to ``--workers`` processes of one thread each, so every run is timed under the same load
(the other core busy with another run). ``python examples/sweep_report.py`` draws the plots and
tables from the records.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import pathlib
from typing import Any, Optional

from tqdm import tqdm

import experiment
import vcas
from ubcompile.config import SamplingConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_VCAS_TAU = vcas.VCASConfig.act_tau

MODELS: dict[str, tuple[str, list[str], int]] = {
    # name: (example module, its options for the sweep: sizes for about 20-60 s a run on one core, exact's epochs)
    "mlp": ("fashion_mlp", ["--width", "1024", "--limit-train", "20000", "--limit-test", "5000"], 3),
    "bagnet": ("fashion_bagnet", ["--width", "16", "--min-dim", "16", "--limit-train", "10000", "--limit-test", "2000"],
               3),
    "vit": ("fashion_vit", ["--dim", "64", "--limit-train", "10000", "--limit-test", "2000"], 3),
    "gpt": ("char_gpt", ["--dim", "64", "--steps-per-epoch", "200"], 3),
}
WIDE: dict[str, tuple[list[str], int]] = {
    # The same models at the widths people train (issue 22), sized for 3-6 min a run on one core:
    # their options for the sweep and exact's epochs.
    "vit": (["--dim", "256", "--depth", "4", "--limit-train", "10000", "--limit-test", "2000"], 6),
    "gpt": (["--dim", "256", "--depth", "4", "--steps-per-epoch", "200"], 3),
    # 64 channels (128 after the first convolution): exact's test accuracy plateaus at 80-83% from
    # epoch 5.5 of 10 (seed 0, 2026-12-07), about 4 min a run.
    "bagnet": (["--width", "64", "--min-dim", "16", "--limit-train", "10000", "--limit-test", "2000"], 10),
}
WIDE_TRANSFORMERS = ("vit", "gpt")
"""The :data:`WIDE` models of the grids made before ``p="auto"`` controlled convolutions (2026-12-07)."""
GRADS = ("weight", "both")
SKETCHES = ("uniform", "norm")
PS = (0.5, 0.25, 0.1)
SEEDS = (0, 1)
LOW_LR_FACTOR = 0.25
LOW_LR_P = 0.25
SAMPLED_EPOCH_FACTOR = 2
"""Sampled runs train this many times exact's epochs: the paper trades more, cheaper epochs for
fewer exact ones, and the curve at exact's epochs gives the same-epochs comparison."""


def grid(model: str) -> list[dict[str, Any]]:
    """The runs of one model, as options of its example script."""
    lr = importlib.import_module(MODELS[model][0]).LR
    sampled = [{"grad": g, "sketch": s, "p": p} for g, s, p in itertools.product(GRADS, SKETCHES, PS)]
    configs = [{"seed": seed, "lr": lr, **c} for seed in SEEDS for c in [{"exact": True}] + sampled]
    low = [{"exact": True}] + [c for c in sampled if c["p"] == LOW_LR_P]
    configs += [{"seed": SEEDS[0], "lr": lr * LOW_LR_FACTOR, **c} for c in low]
    return [{"model": model, **c} for c in configs]


AUTO_MODELS = ("mlp", "vit")
AUTO_SEEDS = (0, 1, 2, 3)  # the runs are short and their accuracy after 3 epochs varies by points
MANY_SEEDS = tuple(range(16))
AUTO_BUDGETS = {0.1: MANY_SEEDS, 0.25: MANY_SEEDS, 0.5: MANY_SEEDS, 1.0: AUTO_SEEDS, 2.0: AUTO_SEEDS}
"""Budget: its seeds. The accuracy after 3 epochs varies by 0.3-3 points from seed to seed, so 4
seeds leave a standard error near issue 7's 0.5-point criterion: the candidates for the default
budget get 16."""


AUTO_FIXED_P = 0.25  # the default fixed fraction, run beside p="auto" as the reference trade-off


def auto_grid(model: str) -> list[dict[str, Any]]:
    """``p="auto"`` at each budget against exact (every seed any budget uses) and the default fixed
    ``p``, at exact's learning rate and epochs."""
    lr = importlib.import_module(MODELS[model][0]).LR
    runs = [({"exact": True}, sorted(set().union(*AUTO_BUDGETS.values()))),
            ({"p": AUTO_FIXED_P, "grad": "weight", "sketch": "norm", "same_epochs": True}, MANY_SEEDS)]
    runs += [({"p": "auto", "grad": "weight", "sketch": "norm", "budget": b}, seeds) for b, seeds in AUTO_BUDGETS.items()]
    return [{"model": model, "seed": seed, "lr": lr, **c} for c, seeds in runs for seed in seeds]


CONFIRM_SEEDS = {"mlp": tuple(range(16, 32)), "vit": tuple(range(16, 64)), "gpt": tuple(range(16, 24))}
"""Seeds not used by :func:`auto_grid`. The ViT's 3-epoch accuracy varies by 7 points between seeds,
so its paired standard error needs four times the MLP's seeds to come near 0.25 point. The GPT
(added 2026-12-03, never run under ``p="auto"`` before) had no budget search: its 8 seeds test the
default chosen on the MLP and ViT."""


def confirm_grid(model: str, seeds: Optional[tuple[int, ...]] = None) -> list[dict[str, Any]]:
    """Exact and ``p="auto"`` at the default budget on ``seeds`` (default :data:`CONFIRM_SEEDS`), chosen
    before these runs: a test of the default on seeds that did not select it."""
    lr = importlib.import_module(MODELS[model][0]).LR
    auto = {"p": "auto", "grad": "weight", "sketch": "norm", "budget": SamplingConfig.budget}
    seeds = CONFIRM_SEEDS[model] if seeds is None else seeds
    return [{"model": model, "seed": seed, "lr": lr, **c} for seed in seeds for c in ({"exact": True}, auto)]


WIDE_SEEDS = tuple(range(100, 108))
"""Seeds no earlier run used: the default budget was chosen at width 64, so these runs test it."""


def wide_grid(model: str) -> list[dict[str, Any]]:
    """Exact and ``p="auto"`` at the default budget on the :data:`WIDE` sizes, seed by seed."""
    return [{**c, "size": "wide"} for c in confirm_grid(model, WIDE_SEEDS)]


def wide_layer_grid(model: str) -> list[dict[str, Any]]:
    """:func:`wide_grid` with ``budget_scale="layer"``, into the same records (its exact runs are shared)."""
    return [{**c, "budget_scale": "layer"} if c.get("p") == "auto" else c for c in wide_grid(model)]


WIDE_STABLE_LR = 1e-3
"""The wide GPT's Adam learning rate in :func:`wide_stable_grid`: at the width-64 rate (3e-3) 2 of 8
exact runs collapsed late (2026-12-04), so the comparison is not one of two trainings that converge."""


WIDE_STABLE_MODELS = ("gpt",)
"""The models :func:`wide_stable_grid` runs: those whose exact training at their own learning rate is
unstable at width 256."""


def wide_stable_grid(model: str) -> list[dict[str, Any]]:
    """:func:`wide_layer_grid` at :data:`WIDE_STABLE_LR`, into the same records (the learning rate is
    part of a run's key)."""
    return [{**c, "lr": WIDE_STABLE_LR} for c in wide_layer_grid(model)]


def wide_vcas_lr(model: str) -> float:
    """The learning rate of the width-256 ``p="auto"`` runs VCAS is paired with: :data:`WIDE_STABLE_LR`
    for the :data:`WIDE_STABLE_MODELS` (:func:`wide_stable_grid`), else the model's own
    (:func:`wide_layer_grid`)."""
    return WIDE_STABLE_LR if model in WIDE_STABLE_MODELS else importlib.import_module(MODELS[model][0]).LR


def wide_vcas_grid(model: str, tau: float = DEFAULT_VCAS_TAU) -> list[dict[str, Any]]:
    """VCAS (its defaults, or variance allowance ``tau``) on the width-256 ``p="auto"`` runs' model,
    learning rate (:func:`wide_vcas_lr`) and seeds."""
    return [{"model": model, "seed": seed, "lr": wide_vcas_lr(model), "size": "wide", "vcas": True, "vcas_tau": tau}
            for seed in WIDE_SEEDS]


MATCHED_VCAS_TAU = {"gpt": 0.8, "vit": 0.006}
"""Model: the ``tau`` at which VCAS's training steps spend about the backward FLOPs ``p="auto"`` spends
on the width-256 runs at :func:`wide_vcas_lr`, found on seed 100 (2026-12-07; the runs in
``wide_vcas_calibration_runs.jsonl``, the one at the chosen ``tau`` also in the grid's records;
docs/EXPERIMENTS.md). The GPT (``p="auto"``: 0.659 of exact's): 0.887 of exact's at the default 0.025,
0.747 at 0.25 and 0.653 at 0.8. The ViT (``p="auto"``: 0.577): 0.500 at the
default 0.025, 0.549 at 0.01 and 0.578 at 0.006 (taken)."""


def wide_vcas_matched_grid(model: str) -> list[dict[str, Any]]:
    """:func:`wide_vcas_grid` at the model's :data:`MATCHED_VCAS_TAU`."""
    return wide_vcas_grid(model, MATCHED_VCAS_TAU[model])


def wide_conv_grid(model: str) -> list[dict[str, Any]]:
    """Exact and ``p="auto"`` with its default options (``budget_scale="layer"``, the cost rule on) on
    the :data:`WIDE` sizes and seeds: the BagNet, whose convolutions the controller took on 2026-12-07."""
    return [c for c in wide_layer_grid(model) if c.get("exact")] + wide_timed_grid(model)


def wide_timed_grid(model: str) -> list[dict[str, Any]]:
    """``p="auto"`` with the cost rule on (``min_speedup=1``): the controller offers only the options
    its device's fitted cost models predict faster than exact, priced in time (on this CPU at width
    256: the norm sketch alone), on the width-256 runs' model, learning rate (:func:`wide_vcas_lr`)
    and seeds, to pair with their exact runs."""
    return [{**c, "lr": wide_vcas_lr(model), "min_speedup": 1.0} for c in wide_layer_grid(model) if not c.get("exact")]


BASELINE_SEEDS = 8
"""Runs per model of the VCAS and layer-scaled grids: the first seeds of :data:`CONFIRM_SEEDS`, whose
exact and ``p="auto"`` runs are in ``auto_confirm_runs.jsonl`` to pair with."""


def vcas_grid(model: str) -> list[dict[str, Any]]:
    """VCAS (``examples/vcas.py``, its defaults) at exact's learning rate and epochs, on the seeds
    of the ``p="auto"`` confirmation runs."""
    lr = importlib.import_module(MODELS[model][0]).LR
    return [{"model": model, "seed": seed, "lr": lr, "vcas": True} for seed in CONFIRM_SEEDS[model][:BASELINE_SEEDS]]


MATCHED_VCAS_TAU_CONFIRM = {"mlp": 0.017}
"""Model: the ``tau`` at which VCAS's training steps spend about the backward FLOPs ``p="auto"``
(``budget_scale="layer"``, :func:`layer_scale_grid`) spends on :func:`vcas_grid`'s runs, found on seed
16 (2026-12-07; the runs in ``vcas_calibration_runs.jsonl``; docs/EXPERIMENTS.md). The MLP
(``p="auto"``: 0.551 of exact's on seed 16, 0.553 over seeds 16-23): 0.515 at the default 0.025, 0.533
at 0.02, 0.546 at 0.017 (taken), 0.542 at 0.016, 0.559 at 0.015 and 0.581 at 0.01."""


def vcas_matched_grid(model: str) -> list[dict[str, Any]]:
    """:func:`vcas_grid` at the model's :data:`MATCHED_VCAS_TAU_CONFIRM`."""
    return [{**c, "vcas_tau": MATCHED_VCAS_TAU_CONFIRM[model]} for c in vcas_grid(model)]


MATCHED_VCAS_TAU_PROPAGATED = (0.05, 0.13)
"""The MLP's ``tau`` at which VCAS's training steps spend about the backward FLOPs of
:func:`propagated_grid`'s ``grad="both"`` runs, found on seed 16 (2026-12-08; the runs in
``vcas_calibration_runs.jsonl``): 0.467 at 0.05 (``p="auto"`` at budget 0.1: 0.476 over the seeds)
and 0.405 at 0.13 (budget 0.2: 0.411); 0.423 at 0.1 and 0.357 at 0.3."""


def vcas_propagated_grid(model: str) -> list[dict[str, Any]]:
    """:func:`vcas_grid` at each of :data:`MATCHED_VCAS_TAU_PROPAGATED`."""
    return [{**c, "vcas_tau": tau} for tau in MATCHED_VCAS_TAU_PROPAGATED for c in vcas_grid(model)]


def layer_scale_grid(model: str) -> list[dict[str, Any]]:
    """``p="auto"`` at the default budget with ``budget_scale="layer"`` on the same seeds."""
    return [{**c, "budget_scale": "layer"} for c in confirm_grid(model, CONFIRM_SEEDS[model][:BASELINE_SEEDS])
            if not c.get("exact")]


def timed_grid(model: str) -> list[dict[str, Any]]:
    """:func:`layer_scale_grid` with the cost rule on (``min_speedup=1``, as :func:`wide_timed_grid`),
    into the same records (its key names the rule)."""
    return [{**c, "min_speedup": 1.0} for c in layer_scale_grid(model)]


def propagated_grid(model: str) -> list[dict[str, Any]]:
    """:func:`timed_grid` with ``grad="both"`` (the controller samples the propagated gradients too:
    one nested draw a step, :class:`ubcompile.auto.controller.Propagation`), with exact and
    :func:`timed_grid` again on the same seeds, all timed in one sweep."""
    timed = timed_grid(model)
    exact = [c for c in confirm_grid(model, CONFIRM_SEEDS[model][:BASELINE_SEEDS]) if c.get("exact")]
    both = [{**c, "grad": "both"} for c in timed]
    runs = [c for trio in zip(exact, timed, both) for c in trio]  # seed by seed
    return runs + [{**c, "budget": PROPAGATED_BUDGET} for c in both]


PROPAGATED_BUDGET = 0.2
"""A second budget for :func:`propagated_grid`'s ``grad="both"`` runs (2026-12-08, after the default
budget's): how far more variance buys the 60% fewer backward FLOPs of issue 22."""

LONG_EPOCHS = 10
"""Exact's epochs in :func:`propagated_long_grid`: at 3 the MLP's test accuracy still rises between
its last evaluations, and a run of 12 s is a quarter the controller's one-off compiles."""


def propagated_long_grid(model: str) -> list[dict[str, Any]]:
    """:func:`propagated_grid` at the default budget for :data:`LONG_EPOCHS` epochs, into its own
    records (a run's key does not name its epochs)."""
    return [{**c, "epochs": LONG_EPOCHS} for c in propagated_grid(model) if c.get("budget") != PROPAGATED_BUDGET]


MEMORY_P = 0.25


def memory_grid(model: str) -> list[dict[str, Any]]:
    """Weight-gradient rows at ``p = 0.25`` drawn from ``||G_j|| ||A_j||`` (norm, in the backward) and
    from ``||A_j||`` (activation, in the forward: memory-saving), against exact, at exact's epochs."""
    lr = importlib.import_module(MODELS[model][0]).LR
    sampled = [{"p": MEMORY_P, "grad": "weight", "sketch": s, "same_epochs": True} for s in ("norm", "activation")]
    return [{"model": model, "seed": seed, "lr": lr, **c} for seed in AUTO_SEEDS for c in [{"exact": True}] + sampled]


GRIDS = {"main": (grid, "runs.jsonl", tuple(MODELS)), "auto": (auto_grid, "auto_runs.jsonl", AUTO_MODELS),
         "auto-confirm": (confirm_grid, "auto_confirm_runs.jsonl", tuple(CONFIRM_SEEDS)),
         "memory": (memory_grid, "memory_runs.jsonl", AUTO_MODELS),
         "wide": (wide_grid, "wide_runs.jsonl", WIDE_TRANSFORMERS),
         "wide-layer": (wide_layer_grid, "wide_runs.jsonl", WIDE_TRANSFORMERS),
         "wide-stable": (wide_stable_grid, "wide_runs.jsonl", WIDE_STABLE_MODELS),
         "wide-vcas": (wide_vcas_grid, "wide_runs.jsonl", tuple(MATCHED_VCAS_TAU)),
         "wide-vcas-matched": (wide_vcas_matched_grid, "wide_runs.jsonl", tuple(MATCHED_VCAS_TAU)),
         "wide-timed": (wide_timed_grid, "wide_runs.jsonl", WIDE_TRANSFORMERS),
         "wide-conv": (wide_conv_grid, "wide_runs.jsonl", ("bagnet",)),
         "wide-conv-reads": (wide_conv_grid, "wide_conv_reads_runs.jsonl", ("bagnet",)),
         "vcas": (vcas_grid, "vcas_runs.jsonl", tuple(CONFIRM_SEEDS)),
         "vcas-matched": (vcas_matched_grid, "vcas_runs.jsonl", tuple(MATCHED_VCAS_TAU_CONFIRM)),
         "layer-scale": (layer_scale_grid, "layer_scale_runs.jsonl", tuple(CONFIRM_SEEDS)),
         "timed": (timed_grid, "layer_scale_runs.jsonl", ("mlp",)),
         "propagated": (propagated_grid, "propagated_runs.jsonl", ("mlp",)),
         "propagated-long": (propagated_long_grid, "propagated_long_runs.jsonl", ("mlp",)),
         "vcas-propagated": (vcas_propagated_grid, "vcas_runs.jsonl", ("mlp",))}
"""name: (the runs of one model, the records file, the models it covers)."""


RECORDED_SCALE = "global"
"""The ``budget_scale`` of a ``p="auto"`` run or record that names none: every record made before
2026-12-04, when ``"layer"`` became the default. The grids that made them keep it."""


def key(config: dict[str, Any]) -> tuple:
    exact, vcas = config.get("exact", False), config.get("vcas", False)
    fixed = exact or vcas  # no ubcompile options
    scale = config.get("budget_scale", RECORDED_SCALE)
    auto = config.get("p") == "auto"
    return (config["model"], exact, None if fixed else config["p"], None if fixed else config["grad"],
            None if fixed else config["sketch"], round(config["lr"], 10), config["seed"],
            config.get("budget") if auto else None) + ((scale,) if auto and scale != RECORDED_SCALE
                                                       else ()) + (vcas_key(config) if vcas else ()) + (
        ("min_speedup", config["min_speedup"]) if config.get("min_speedup") else ())


def vcas_key(config: dict[str, Any]) -> tuple:
    """A VCAS run's part of its key: its ``tau`` where it is not VCAS's default (older records name none)."""
    tau = config.get("vcas_tau", DEFAULT_VCAS_TAU)
    return ("vcas",) + (() if tau == DEFAULT_VCAS_TAU else (tau,))


def record_key(record: dict[str, Any]) -> tuple:
    config = record["config"]
    rule = record["label"].partition(" min_speedup=")[2]
    if rule and "min_speedup" not in config:  # made before the records named it (2026-12-08): their label does
        config = {**config, "min_speedup": float(rule.split()[0])}
    return key({"model": record["task"], **config})


def sizes(config: dict[str, Any]) -> tuple[list[str], int]:
    """The size options and exact's epochs for ``config``'s model at its size."""
    wide = config.get("size") == "wide" and config["model"] in WIDE  # the MLP is wide already
    return WIDE[config["model"]] if wide else MODELS[config["model"]][1:]


def argv(config: dict[str, Any]) -> list[str]:
    options, epochs = sizes(config)
    epochs = config.get("epochs", epochs)
    args = options + ["--lr", repr(config["lr"]), "--seed", str(config["seed"]), "--threads", "1",
                      "--evals-per-epoch", "2", "--no-progress"]
    if config.get("exact"):
        return args + ["--exact", "--epochs", str(epochs)]
    if "min_speedup" in config:
        args += ["--min-speedup", repr(config["min_speedup"])]
    if config.get("vcas"):
        return args + ["--vcas", "--vcas-tau", repr(config.get("vcas_tau", DEFAULT_VCAS_TAU)), "--epochs", str(epochs)]
    if config["p"] == "auto":
        return args + ["--epochs", str(epochs), "--p", "auto", "--budget", str(config["budget"]),
                       "--budget-scale", config.get("budget_scale", RECORDED_SCALE), "--grad", config.get("grad", "weight")]
    factor = 1 if config.get("same_epochs") else SAMPLED_EPOCH_FACTOR
    return args + ["--epochs", str(epochs * factor), "--p", str(config["p"]), "--grad", config["grad"],
                   "--sketch", config["sketch"]]


def parse(config: dict[str, Any]) -> argparse.Namespace:
    module = importlib.import_module(MODELS[config["model"]][0])
    return experiment.parse_args(argv(config), module.__doc__, module.LR, module.EPOCHS, module.OPTIMIZER,
                                 module.add_arguments)


@functools.lru_cache(maxsize=None)
def task(model: str, size: Optional[str] = None) -> experiment.Task:
    """The model's data and task at its size, loaded once per worker."""
    module = importlib.import_module(MODELS[model][0])
    return module.build_task(parse({"model": model, "size": size, "exact": True, "lr": module.LR, "seed": 0}))


def run_one(config: dict[str, Any]) -> dict[str, Any]:
    return experiment.run(task(config["model"], config.get("size")), parse(config))


def load_records(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "experiments")
    ap.add_argument("--grid", choices=list(GRIDS), default="main", help="which runs (see above)")
    ap.add_argument("--seeds", type=int, nargs="+", help="only the grid's runs of these seeds (to split it between machines)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs_of, filename, covered = GRIDS[args.grid]
    runs = args.out / filename
    done = {record_key(r) for r in load_records(runs)}
    todo = [c for m in args.models if m in covered for c in runs_of(m)
            if key(c) not in done and (args.seeds is None or c["seed"] in args.seeds)]
    print(f"{len(todo)} runs to do, {len(done)} already in {runs}", flush=True)
    # One thread per worker, Inductor's kernel compilation included; set before the workers import torch.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool, \
            tqdm(total=len(todo), desc="sweep", dynamic_ncols=True) as bar:
        futures = {pool.submit(run_one, c): c for c in todo}
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            with runs.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.write(experiment.summary(record))
            bar.update()


if __name__ == "__main__":
    main()
