"""Plots and tables from the sweep's records (``examples/sweep.py``).

    python examples/sweep_report.py [--out docs/experiments]

Writes under ``OUT``:

* ``<model>_curves.png``: test accuracy against epochs, measured training time and backward FLOPs,
  seed 0 at the exact run's learning rate, one row per ``grad`` mode;
* ``final_vs_p.png``: accuracy against ``p`` per model, mean over seeds, after exact's epochs and
  after the sampled runs' longer budget;
* ``tables.md``: per model and configuration, the accuracy per seed after exact's epochs and after
  the longer budget (or the divergence step), the backward FLOPs relative to exact, the accuracy
  after as many backward FLOPs as exact's whole run spent, the median step time relative to exact, and the time to reach the exact run's final accuracy minus 0.5 point relative to
  exact's (mean over seeds, "not reached" if a seed never does); the same accuracies at the lower
  learning rate.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import statistics
from collections.abc import Iterable
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sweep  # noqa: E402

Record = dict[str, Any]
TARGET_GAP = 0.5  # points of accuracy below the exact run's final accuracy
COLORS = {0.5: "tab:blue", 0.25: "tab:orange", 0.1: "tab:red"}
STYLES = {"norm": "-", "uniform": "--"}
AXES = [("epoch", "epochs"), ("time_s", "measured training time (s)"), ("bwd_gflop", "backward GEMM/conv GFLOP")]


def exact_lr(model: str) -> float:
    return sweep.importlib.import_module(sweep.MODELS[model][0]).LR


def by_label(records: list[Record], lr: float) -> dict[str, list[Record]]:
    """Records at learning rate ``lr``, grouped by label (``exact`` or ``grad:sketch p=P``), seeds sorted."""
    groups: dict[str, list[Record]] = collections.defaultdict(list)
    for r in sorted(records, key=lambda r: r["config"]["seed"]):
        if abs(r["config"]["lr"] - lr) < 1e-12:
            groups[r["label"]].append(r)
    return groups


def labels() -> list[str]:
    return ["exact"] + [f"{g}:{s} p={p:g}" for g in sweep.GRADS for s in sweep.SKETCHES for p in sweep.PS]


def reached(record: Record, target: float, field: str) -> Optional[float]:
    """``field`` (time, epoch) at the first evaluation with accuracy >= ``target``; None if never."""
    return next((pt[field] for pt in record["curve"] if pt["acc"] >= target), None)


def mean_reached(runs: list[Record], target: float, field: str) -> Optional[float]:
    values = [reached(r, target, field) for r in runs]
    return None if not values or None in values else statistics.mean(values)


def exact_target(groups: dict[str, list[Record]]) -> float:
    return statistics.mean(r["final_acc"] for r in groups["exact"]) - TARGET_GAP


def exact_epochs(model: str) -> int:
    return sweep.MODELS[model][2]


def acc_at(record: Record, epoch: float) -> Optional[float]:
    """Test accuracy after ``epoch`` epochs; None if the run diverged before or stopped earlier."""
    return next((pt["acc"] for pt in record["curve"] if abs(pt["epoch"] - epoch) < 1e-9), None)


def acc_within(record: Record, gflop: float) -> Optional[float]:
    """Accuracy at the last evaluation whose backward GFLOP so far is within ``gflop``."""
    points = [pt for pt in record["curve"] if pt["bwd_gflop"] <= gflop * (1 + 1e-9)]
    return points[-1]["acc"] if points and (record["status"] == "ok" or points[-1] is not record["curve"][-1]) else None


def fmt_acc(record: Record, epoch: float) -> str:
    acc = acc_at(record, epoch)
    if acc is None and record["status"] != "ok":
        return f"diverged at step {record['diverged_step']}"
    return "-" if acc is None else f"{acc:.2f}"


def ratio(value: Optional[float], reference: Optional[float]) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}"


def model_table(model: str, records: list[Record]) -> str:
    lr = exact_lr(model)
    groups, low = by_label(records, lr), by_label(records, lr * sweep.LOW_LR_FACTOR)
    target = exact_target(groups)
    exact_time = mean_reached(groups["exact"], target, "time_s")
    exact_step = statistics.mean(r["median_step_ms"] for r in groups["exact"])
    e = exact_epochs(model)
    e2 = e * sweep.SAMPLED_EPOCH_FACTOR
    seeds = ", ".join(str(s) for s in sweep.SEEDS)
    rows = [f"| run | acc % after {e} epochs (seed {seeds}) | after {e2} epochs | backward FLOPs vs exact "
            f"| acc % at exact's backward FLOPs | step time vs exact | time to {target:.2f}% vs exact "
            f"| at lr {lr * sweep.LOW_LR_FACTOR:g}: after {e} / {e2} epochs |", "|---|---|---|---|---|---|---|---|"]
    budget = groups["exact"][0]["curve"][-1]["bwd_gflop"]
    for name in labels():
        runs = groups.get(name, [])
        if not runs:
            continue
        flops = runs[0]["bwd_gflop_per_step"]
        step = statistics.mean(r["median_step_ms"] for r in runs)
        time = mean_reached(runs, target, "time_s")
        ttt = ratio(time, exact_time) if time is not None else "not reached"
        low_acc = " / ".join(fmt_acc(r, ep) for r in low.get(name, []) for ep in (e, e2) if r["config"]["epochs"] >= ep)
        later = " / ".join(fmt_acc(r, e2) for r in runs) if runs[0]["config"]["epochs"] >= e2 else ""
        at_budget = " / ".join("-" if (a := acc_within(r, budget)) is None else f"{a:.2f}" for r in runs)
        rows.append(f"| {name} | {' / '.join(fmt_acc(r, e) for r in runs)} | {later} "
                    f"| {flops['sampled'] / flops['exact']:.3f} | {at_budget} | {step / exact_step:.2f} | {ttt} "
                    f"| {low_acc} |")
    first = groups["exact"][0]
    env = first["env"]
    exact_steps = [r["median_step_ms"] for r in groups["exact"] + low.get("exact", [])]
    optimizer = {"sgd": "SGD, momentum 0.9", "adam": "Adam"}[first["config"]["optimizer"]]
    header = (f"### {model}\n\nlearning rate {lr:g} ({optimizer}), epochs of {first['steps_per_epoch']} steps; "
              f"exact: {e} epochs, median step {exact_step:.1f} ms ({min(exact_steps):.1f}-{max(exact_steps):.1f} "
              f"over its {len(exact_steps)} runs), "
              f"{first['bwd_gflop_per_step']['exact']:.3f} backward GFLOP per step; "
              f"torch {env['torch']}, {env['cpu_count']} CPUs, {env['threads']} thread per run, {env['date']}.\n")
    return header + "\n" + "\n".join(rows) + "\n"


def plot_curves(model: str, records: list[Record], path: pathlib.Path) -> None:
    groups = by_label(records, exact_lr(model))
    exact = groups["exact"][0]
    fig, axes = plt.subplots(len(sweep.GRADS), len(AXES), figsize=(15, 4.2 * len(sweep.GRADS)), squeeze=False)
    top = max(pt["acc"] for runs in groups.values() for pt in runs[0]["curve"])
    for row, grad in enumerate(sweep.GRADS):
        for col, (field, xlabel) in enumerate(AXES):
            ax = axes[row][col]
            curves = [("exact", exact, "black", "-")] + [
                (f"{s} p={p:g}", groups[f"{grad}:{s} p={p:g}"][0], COLORS[p], STYLES[s])
                for s in sweep.SKETCHES for p in sweep.PS if f"{grad}:{s} p={p:g}" in groups]
            for name, run, color, style in curves:
                xs, ys = [pt[field] for pt in run["curve"]], [pt["acc"] for pt in run["curve"]]
                ax.plot(xs, ys, style, color=color, label=name, marker=None if run["status"] == "ok" else "x",
                        markevery=[len(xs) - 1] if run["status"] != "ok" else None)
            ax.set_ylim(max(0.0, top - 30), top + 2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"{model}, grad={grad}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="sketch, p (x: diverged)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_final_vs_p(records_by_model: dict[str, list[Record]], path: pathlib.Path) -> None:
    """Accuracy against p, mean over seeds, after exact's epochs (top) and after the sampled runs'
    longer budget (bottom); a configuration with a diverged seed has no point."""
    models = list(records_by_model)
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        groups = by_label(records_by_model[model], exact_lr(model))
        exact = statistics.mean(r["final_acc"] for r in groups["exact"])
        for row, epoch in enumerate((exact_epochs(model), exact_epochs(model) * sweep.SAMPLED_EPOCH_FACTOR)):
            ax = axes[row][col]
            ax.axhline(exact, color="black", label=f"exact, {exact_epochs(model)} epochs")
            ax.axhline(exact - TARGET_GAP, color="black", ls=":", lw=1, label=f"exact - {TARGET_GAP}")
            plotted = [exact]
            for grad, sketch in ((g, s) for g in sweep.GRADS for s in sweep.SKETCHES):
                points = [(p, [acc_at(r, epoch) for r in groups.get(f"{grad}:{sketch} p={p:g}", [])])
                          for p in sweep.PS]
                ok = [(p, statistics.mean(a)) for p, a in points if a and None not in a]
                plotted += [a for _, a in ok]
                ax.plot([p for p, _ in ok], [a for _, a in ok], STYLES[sketch], marker="o",
                        color="tab:green" if grad == "weight" else "tab:purple", label=f"{grad}:{sketch}")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(list(sweep.PS), [f"{p:g}" for p in sweep.PS])
            ax.set_xlim(min(sweep.PS) * 0.8, max(sweep.PS) * 1.25)
            ax.set_ylim(min(plotted) - 2, max(plotted) + 2)
            ax.set_xlabel("p (missing point: a seed diverged)")
            ax.set_ylabel(f"test accuracy % after {epoch} epochs")
            ax.set_title(f"{model}: sampled runs after {epoch} epochs")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def out_dir(doc: str) -> pathlib.Path:
    """The ``--out`` directory of a report script (``docs/experiments`` by default)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=sweep.ROOT / "docs" / "experiments")
    return ap.parse_args().out


def records_by_model(path: pathlib.Path, models: Iterable[str]) -> dict[str, list[Record]]:
    """The records in ``path``, grouped by model, for those of ``models`` that have any."""
    records: dict[str, list[Record]] = collections.defaultdict(list)
    for r in sweep.load_records(path):
        records[r["task"]].append(r)
    return {m: records[m] for m in models if records.get(m)}


def write_tables(tables: list[str], path: pathlib.Path) -> None:
    text = "\n".join(tables)
    path.write_text(text)
    print(text)


def main() -> None:
    out = out_dir(__doc__)
    records = records_by_model(out / "runs.jsonl", sweep.MODELS)
    for model, runs in records.items():
        plot_curves(model, runs, out / f"{model}_curves.png")
    plot_final_vs_p(records, out / "final_vs_p.png")
    write_tables([model_table(m, runs) for m, runs in records.items()], out / "tables.md")


if __name__ == "__main__":
    main()
