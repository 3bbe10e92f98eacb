"""Tables and plots of the runs at exact's epochs: ``p="auto"`` and the memory-saving sketch.

    python examples/auto_report.py [--grid auto|auto-confirm|memory] [--out docs/experiments]

For ``--grid auto`` (``python examples/sweep.py --grid auto``) it writes under ``OUT``:

* ``auto.md``: per model, exact and each budget: the seeds, the final accuracy's mean and
  standard error, its difference to exact's run of the same seed (mean and standard error), backward FLOPs relative to exact, median step time relative to
  exact, the training time to exact's mean final accuracy minus 0.5 point relative to exact's
  (means over the runs that reach it, with their count);
* ``auto_fractions.png``: per model (seed 0, default budget), the keep fraction of each controlled
  layer over training, and test accuracy against backward FLOPs and against training time for
  exact and every budget.

For ``--grid auto-confirm`` (the default budget on fresh seeds): ``auto-confirm.md``, the same
table; ``--grid wide`` (the realistic widths): ``wide.md`` and ``wide_fractions.png``, with the ViT's VCAS runs
(``--grid wide-vcas`` and ``wide-vcas-matched``); ``--grid wide-stable``: ``wide-stable.md``, the wide GPT at
``sweep.WIDE_STABLE_LR`` with its VCAS runs; ``--grid wide-conv``: ``wide-conv.md`` and
``wide-conv_fractions.png``, the 64-channel BagNet (``--grid wide-conv-reads``: its re-run); ``--grid
propagated``: ``propagated.md`` and ``propagated_fractions.png``, the MLP's exact, ``grad="weight"`` and
``grad="both"`` runs of one sweep (``--grid propagated-long``: for 10 epochs); ``wide`` and ``wide-stable`` add ``p="auto"`` minus each VCAS run of the same seed; ``--grid vcas``
and ``--grid layer-scale``: ``vcas.md`` and ``layer-scale.md``, with the exact and ``p="auto"`` runs of
``auto-confirm`` on the same seeds. For ``--grid memory`` (``python examples/sweep.py --grid memory``): ``memory.md``, the same
table for the norm and activation sketches at ``p = 0.25``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import experiment  # noqa: E402
import sweep  # noqa: E402
from sweep_report import by_label, exact_lr, exact_target, reached, records_by_model, write_tables  # noqa: E402

from ubcompile.config import SamplingConfig  # noqa: E402

Record = dict[str, Any]
DEFAULT_LABEL = experiment.auto_label(SamplingConfig.budget, SamplingConfig.budget_scale)
"""The label of a run at ``p="auto"``'s default options."""


def default_run(groups: dict[str, list[Record]]) -> Record:
    """The first run at the default options, else at the default budget under any scale (the records
    made before ``"layer"`` became the default), else the first ``p="auto"`` run."""
    auto = sorted(label for label in groups if label.startswith("auto budget="))
    default_budget = [label for label in auto if label.startswith(f"auto budget={SamplingConfig.budget:g}")]
    return next(groups[label][0] for label in [DEFAULT_LABEL, *default_budget, *auto] if groups.get(label))


def auto_labels(records: list[Record]) -> list[str]:
    """``exact``, the fixed fractions (and VCAS), and the budgets the records ran, in increasing
    order, each global before layer-scaled."""
    fixed = sorted({r["label"] for r in records if not r["config"].get("exact") and r["config"]["p"] != "auto"})
    auto = {(r["config"]["budget"], r["config"].get("budget_scale") or "global", r["label"])
            for r in records if r["config"].get("p") == "auto"}
    return ["exact", *fixed] + [label for *_, label in sorted(auto)]


def memory_labels() -> list[str]:
    return ["exact"] + [f"weight:{s} p={sweep.MEMORY_P:g}" for s in ("norm", "activation")]


def reached_time(runs: list[Record], target: float) -> tuple[float, int]:
    """Mean training time to ``target`` over the runs that reach it, and how many do."""
    times = [t for t in (reached(r, target, "time_s") for r in runs) if t is not None]
    return (statistics.mean(times) if times else float("nan")), len(times)


def fmt_time(time: tuple[float, int], exact: tuple[float, int], runs: int) -> str:
    if not time[1]:
        return f"not reached (0 of {runs})"
    return f"{time[0] / exact[0]:.2f} ({time[1]} of {runs} reach it)" if exact[0] > 0 else "-"


def mean_se(values: list[float]) -> str:
    """``mean ± standard error`` (the error only from two values on)."""
    if len(values) < 2:
        return f"{statistics.mean(values):.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f}"


def paired_differences(runs: list[Record], exact: list[Record]) -> list[float]:
    """Final accuracy minus exact's of the same seed (same initialisation and data order)."""
    exact_acc = {r["config"]["seed"]: r["final_acc"] for r in exact if r["status"] == "ok"}
    return [r["final_acc"] - exact_acc[r["config"]["seed"]] for r in runs
            if r["status"] == "ok" and r["config"]["seed"] in exact_acc]


def versus_vcas(groups: dict[str, list[Record]]) -> list[str]:
    """The lines of a table: the default ``p="auto"`` run's final accuracy minus each VCAS run's
    (every ``tau``) of the same seed; none without both."""
    auto = groups.get(DEFAULT_LABEL, [])
    vcas = sorted(label for label in groups if label.startswith("vcas"))
    if not auto or not vcas:
        return []
    lines = ["", f"| {DEFAULT_LABEL} minus, same seed | seeds | mean ± s.e. |", "|---|---|---|"]
    for label in vcas:
        seeds = sorted({r["config"]["seed"] for r in auto} & {r["config"]["seed"] for r in groups[label]})
        lines.append(f"| {label} | {min(seeds)}-{max(seeds)} | {mean_se(paired_differences(auto, groups[label]))} |")
    return lines


def model_table(model: str, records: list[Record], labels: list[str], timed: bool = True,
                lr: Optional[float] = None, versus: bool = False) -> str:
    """The table of one model's runs at ``lr`` (default: the model's); ``timed=False`` leaves out the
    step and training times (runs made on other days, under other loads: their times do not compare);
    ``versus`` adds :func:`versus_vcas`."""
    groups = by_label(records, exact_lr(model) if lr is None else lr)
    target = exact_target(groups)
    exact = groups["exact"]
    exact_time = reached_time(exact, target)
    exact_step = statistics.median(r["median_step_ms"] for r in exact)
    lines = [f"### {model}", "",
             f"exact: {exact[0]['steps_per_epoch'] * exact[0]['config']['epochs']:g} steps "
             f"({exact[0]['config']['epochs']:g} epochs), {exact[0]['config']['optimizer']} lr "
             f"{exact[0]['config']['lr']:g}, median step {exact_step:.1f} ms; target {target:.2f}% "
             f"(exact's mean minus 0.5); {exact[0]['env']['torch']}, {exact[0]['env']['cpu_count']} CPUs, "
             f"{exact[0]['env']['date']}.", "",
             "| run | seeds | final acc % (mean ± s.e.) | minus exact, same seed (mean ± s.e.) "
             "| backward FLOPs vs exact | step time vs exact | time to target vs exact | diverged |",
             "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        runs = groups.get(label, [])
        if not runs:
            continue
        finals = [r["final_acc"] for r in runs if r["status"] == "ok"]
        flops = f'{statistics.mean(r["bwd_gflop_per_step"]["sampled"] / r["bwd_gflop_per_step"]["exact"] for r in runs):.3f}'
        if all("training_flop_ratio" in r.get("vcas", {}) for r in runs):  # VCAS: its measurements' passes apart
            flops += f' ({statistics.mean(r["vcas"]["training_flop_ratio"] for r in runs):.3f} in training steps)'
        step = statistics.median(r["median_step_ms"] for r in runs) / exact_step
        time = reached_time(runs, target)
        seeds = [r["config"]["seed"] for r in runs]
        lines.append(f"| {label} | {min(seeds)}-{max(seeds)} | {mean_se(finals)} "
                     f"| {mean_se(paired_differences(runs, exact)) if label != 'exact' else '-'} "
                     f"| {flops} | {f'{step:.2f}' if timed else '-'} "
                     f"| {fmt_time(time, exact_time, len(runs)) if timed else '-'} "
                     f"| {sum(r['status'] != 'ok' for r in runs)} of {len(runs)} |")
    return "\n".join(lines + (versus_vcas(groups) if versus else [])) + "\n"


def plot(records_by_model: dict[str, list[Record]], path: pathlib.Path) -> None:
    models = list(records_by_model)
    fig, axes = plt.subplots(3, len(models), figsize=(6 * len(models), 12), squeeze=False)
    for col, model in enumerate(models):
        groups = by_label(records_by_model[model], exact_lr(model))
        run = default_run(groups)
        ax = axes[0][col]
        total = run["curve"][-1]["step"]
        for site in (s for s in run["auto"]["sites"] if s["timeline"]):  # (sites of the records before 2026-12-03 of kind "rows" have none)
            steps = [change[0] for change in site["timeline"]] + [total]
            fractions = [change[1] for change in site["timeline"]]
            name = site["module"] + (" (propagated)" if site.get("family") == "propagated" else "")
            line, = ax.step(steps, fractions + fractions[-1:], where="post", label=name)
            residual = [change[:2] for change in site["timeline"] if change[2] == "residual"]
            if residual:
                ax.plot(*zip(*residual), "o", color=line.get_color(), markersize=4)
        ax.set(title=f"{model}: keep fraction per layer ({run['label']}, seed {run['config']['seed']})\n"
                     "o: a change to a residual-sketch option",
               xlabel="training step", ylabel="keep fraction p", yscale="log")
        ax.legend(fontsize=7)
        for row, (x, xlabel) in enumerate([("bwd_gflop", "backward GEMM GFLOP"), ("time_s", "training time (s)")], 1):
            ax = axes[row][col]
            for label in auto_labels(records_by_model[model]):
                for r in groups.get(label, [])[:1]:
                    ax.plot([pt[x] for pt in r["curve"]], [pt["acc"] for pt in r["curve"]],
                            "k-" if label == "exact" else "-", label=label)
            ax.set(title=f"{model}: test accuracy (each run's first seed)", xlabel=xlabel, ylabel="test accuracy %")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


PAIRED = {"vcas": "auto-confirm", "layer-scale": "auto-confirm"}
"""Grids whose runs are compared with another grid's runs of the same seeds (exact, ``p="auto"``)."""


def with_pairs(records: dict[str, list[Record]], path: pathlib.Path) -> dict[str, list[Record]]:
    """``records`` and, for each model, the runs in ``path`` of the seeds they have."""
    paired = records_by_model(path, records)
    return {m: runs + [r for r in paired.get(m, []) if r["config"]["seed"] in {q["config"]["seed"] for q in runs}]
            for m, runs in records.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=["auto", "auto-confirm", "memory", "wide", "wide-stable", "wide-conv",
                                       "wide-conv-reads", "vcas", "layer-scale", "propagated",
                                       "propagated-long"],
                    default="auto")
    ap.add_argument("--out", type=pathlib.Path, default=sweep.ROOT / "docs" / "experiments")
    args = ap.parse_args()
    _, filename, models = sweep.GRIDS[args.grid]
    records = records_by_model(args.out / filename, models)
    if args.grid in PAIRED:
        records = with_pairs(records, args.out / sweep.GRIDS[PAIRED[args.grid]][1])
    if args.grid in ("auto", "wide", "wide-conv", "wide-conv-reads", "propagated", "propagated-long"):
        plot(records, args.out / f"{args.grid}_fractions.png")
    lr = sweep.WIDE_STABLE_LR if args.grid == "wide-stable" else None  # its VCAS runs (wide-vcas, -matched) too
    tables = [model_table(m, runs, memory_labels() if args.grid == "memory" else auto_labels(runs),
                          timed=args.grid not in PAIRED, lr=lr, versus=args.grid in ("wide", "wide-stable"))
              for m, runs in records.items()]
    write_tables(tables, args.out / f"{args.grid}.md")


if __name__ == "__main__":
    main()
