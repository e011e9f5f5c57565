"""The source-only head against logistic regression: which regulariser lets it match, chosen across tasks.

    .venv/bin/python benchmarks/source_only.py [--tasks digits ...] [--seeds 0 1 2 3 4] [--processes 2]

Issue 16 asks that xfer's source-only head at least match a scikit-learn
logistic regression on the same features (benchmarks/shift_tasks.py's six
tasks). Without any regulariser the bottleneck head overfits the source and
falls short on two of them. This script trains the source-only head (params.yaml's
head section, method source_only, its epoch by source val accuracy, ties to the
later, as benchmarks/selection.py's source-only row) with each of the
regularisers that were tried, five seeds each, and scores it on target test
beside the logistic regression.

The regulariser is then chosen the way benchmarks/soft_temperature.py chooses
its temperature: leave one task out. For each task the variant with the best
mean gap to logistic regression over the *other* tasks is chosen (ties to the
earlier variant in VARIANTS), and its gap on the held-out task is read. Target
test labels choose here only across tasks, never on the task they score.

Writes benchmarks/results/source_only.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks, soft_temperature  # noqa: E402
from benchmarks.selection import machine  # noqa: E402
from xfer.config import Params, load_params  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# What was tried, each against params.yaml's head section; every variant names the source-only head's
# label smoothing (head.source_only_label_smoothing), so the table does not move when params.yaml's own
# value does. The first is no regulariser.
VARIANTS: dict[str, dict] = {
    "none": {"source_only_label_smoothing": 0.0},
    "label_smoothing 0.1": {"source_only_label_smoothing": 0.1},
    "weight_decay 0.01": {"source_only_label_smoothing": 0.0, "weight_decay": 0.01},
    "dropout 0.5": {"source_only_label_smoothing": 0.0, "dropout": 0.5},
    "kind linear": {"source_only_label_smoothing": 0.0, "kind": "linear"},
}


def source_only_accuracy(task: str, params_path: str, variant: str, seed: int) -> float:
    """Target test accuracy of the source-only head with `variant`, its epoch by source val."""
    import torch

    torch.set_num_threads(1)  # one job per process: the pool is the parallelism
    params = load_params(params_path)
    cfg = params.head.model_copy(update={"method": "source_only", "selection": "source_val", **VARIANTS[variant]})
    return shift_tasks.source_only_head_accuracy(shift_tasks.task_features(task, params), params.model_copy(update={"head": cfg}), seed)


def leave_one_task_out(gaps: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per held-out task: the variant with the best mean gap over the other tasks (ties to the earlier
    variant) and that variant's gap on the held-out task (soft_temperature's rule, variants by position)."""
    order = [v for v in VARIANTS if v in next(iter(gaps.values()))]
    by_position = {t: {order.index(v): g for v, g in row.items()} for t, row in gaps.items()}
    return {t: {"chosen": order[r["chosen"]], "held_out_gap": r["held_out"]} for t, r in soft_temperature.leave_one_task_out(by_position).items()}


def summarise(accuracy: dict[str, dict[str, list[float]]], logreg: dict[str, float]) -> dict:
    """Per task and variant: mean accuracy, gap to logistic regression and its standard error over seeds."""
    tasks = {}
    for task, per_variant in accuracy.items():
        rows = {}
        for variant, accs in per_variant.items():
            gaps = np.array(accs) - logreg[task]
            se = float(gaps.std(ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else float("nan")
            rows[variant] = {"per_seed": accs, "accuracy": float(np.mean(accs)), "gap": float(gaps.mean()), "se": se}
        tasks[task] = {"logistic_regression": logreg[task], "variants": rows}
    gaps = {t: {v: r["gap"] for v, r in row["variants"].items()} for t, row in tasks.items()}
    out = {"tasks": tasks}
    if len(tasks) > 1:
        out["leave_one_task_out"] = leave_one_task_out(gaps)
    order = [v for v in VARIANTS if v in next(iter(gaps.values()))]
    out["chosen_on_all"] = max(order, key=lambda v: (np.mean([g[v] for g in gaps.values()]), -order.index(v)))
    return out


def markdown(result: dict) -> str:
    meta, tasks, variants = result["meta"], result["tasks"], list(VARIANTS)
    loo = result.get("leave_one_task_out", {})
    lines = [
        f"Target test accuracy of xfer's source-only head on frozen {meta['backbone']} features (params.yaml's head section, "
        f"method source_only, its epoch by source val accuracy), mean over seeds {', '.join(map(str, meta['seeds']))}, beside a "
        "scikit-learn logistic regression on the same source features. Each cell: accuracy (gap to logistic regression "
        "± its standard error over the seeds). **chosen on the others**: the variant with the best mean gap over the other "
        "tasks; **held out**: its gap on this task, which had no say in it.",
        "",
        "| task | logistic regression | " + " | ".join(variants) + " | chosen on the others | held out |",
        "|---|---:|" + "---:|" * len(variants) + "---|---:|",
    ]
    for name, row in tasks.items():
        cells = [f"{row['variants'][v]['accuracy']:.3f} ({row['variants'][v]['gap']:+.3f} ± {row['variants'][v]['se']:.3f})" for v in variants]
        held = loo.get(name)
        tail = f"{held['chosen']} | {held['held_out_gap']:+.3f}" if held else "| "
        lines.append(f"| {name} | {row['logistic_regression']:.3f} | " + " | ".join(cells) + f" | {tail} |")
    means = [np.mean([row["variants"][v]["gap"] for row in tasks.values()]) for v in variants]
    worst = [min(row["variants"][v]["gap"] for row in tasks.values()) for v in variants]
    lines.append("| **mean gap** | | " + " | ".join(f"{m:+.3f}" for m in means) + " | | |")
    lines.append("| **worst gap** | | " + " | ".join(f"{w:+.3f}" for w in worst) + " | | |")
    lines += [
        "",
        f"Chosen on all {len(tasks)} tasks together: **{result['chosen_on_all']}**; params.yaml's head section has "
        f"source_only_label_smoothing {meta['head']['source_only_label_smoothing']:g}, weight_decay {meta['head']['weight_decay']:g}, "
        f"dropout {meta['head']['dropout']:g}, kind {meta['head']['kind']}.",
        "",
        f"Machine: {meta['machine']}; {meta['seconds']:.0f} s in all. Written by `benchmarks/source_only.py`.",
    ]
    return "\n".join(lines) + "\n"


def run(params_path: str, params: Params, tasks: list[str], seeds: list[int], processes: int) -> dict:
    for task in tasks:  # build images and features once, before the workers read them
        shift_tasks.task_features(task, params)
    jobs = [(t, v, s) for t in tasks for v in VARIANTS for s in seeds]
    with ProcessPoolExecutor(processes) as pool:
        futures = {job: pool.submit(source_only_accuracy, job[0], params_path, job[1], job[2]) for job in jobs}
        accuracy = {t: {v: [futures[(t, v, s)].result() for s in seeds] for v in VARIANTS} for t in tasks}
    logreg = {t: shift_tasks.logistic_regression_accuracy(shift_tasks.task_features(t, params)) for t in tasks}
    return summarise(accuracy, logreg)


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(shift_tasks.TASKS), choices=list(shift_tasks.TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes {args.processes}: must be at least 1 (worker processes training heads side by side)")
    params = load_params(args.params)
    start = time.perf_counter()
    result = run(args.params, params, args.tasks, args.seeds, args.processes)
    result["meta"] = {
        "backbone": params.backbone.name,
        "seeds": args.seeds,
        "head": params.head.model_dump(),
        "variants": VARIANTS,
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    write_json(out / "source_only.json", result)
    table = markdown(result)
    write_text(out / "source_only.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
