"""Suggested target labels against as many random ones: what a few labels buy, and whether choosing them helps.

    .venv/bin/python benchmarks/suggest_labels.py [--tasks digits ...] [--per-class 1 3 10] [--seeds 0 1 2]

For each task of benchmarks/shift_tasks.py (cached features; the split has
no labelled target rows), a head is trained without a target label (params.yaml's
head section with one adaptation method, `--method`, default mcc: what
`head.method: auto` keeps on the digits default; the search itself would cost
seven heads per row). Then, for k labels per class (N = k x classes):

- suggested: the N rows `xfer suggest-labels N` would write (xfer.suggest.suggest_labels
  on the unlabelled target pool, with that zero-label head's predictions, seed 0);
- centre: the same clusters, each one's row nearest its centre (a typical image)
  instead of its most uncertain one: the alternative rule, for comparison;
- random: N rows drawn uniformly from the same pool, one draw per seed (a person
  without a suggestion cannot draw per class either).

A simulated person labels them with their true classes, and a head is trained
again with them as the labelled target budget (xfer.head_stage.head_data's
shape: every pool row stays in the unlabelled target set too). Only the rows
differ: every head trains with seed 0. Target test accuracy scores each head;
target test is never a candidate for labelling (it is not in the pool).

Writes benchmarks/results/suggest_labels.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks  # noqa: E402
from benchmarks.selection import machine  # noqa: E402
from xfer.config import HeadConfig, load_params  # noqa: E402
from xfer.heads import HeadData, predict_proba, train_head  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402
from xfer.suggest import suggest_labels  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_TASKS = list(shift_tasks.TASKS)
TRAIN_SEED = 0


def accuracy(head, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(head, x, "target").argmax(1) == y).mean())


def run_task(name: str, cfg: HeadConfig, per_class: list[int], seeds: list[int]) -> dict:
    fs = shift_tasks.task_features(name)
    source_train, source_val = fs.select("source", "train"), fs.select("source", "val")
    pool_x, pool_y = fs.select("target", "unlabeled")
    target_val = fs.select("target", "val")
    test_x, test_y = shift_tasks.target_test(fs)
    classes = int(fs.index.label.max()) + 1

    def trained(labelled: np.ndarray | None) -> tuple[float, object]:
        data = HeadData(source_train, source_val, pool_x, target_val, None if labelled is None else (pool_x[labelled], pool_y[labelled]))
        head, _ = train_head(cfg, data, classes, TRAIN_SEED)
        return accuracy(head, test_x, test_y), head

    start = time.perf_counter()
    zero, head = trained(None)
    probs = predict_proba(head, pool_x, "target")
    row: dict = {"zero_labels": zero, "pool": len(pool_y), "classes": classes, "per_class": {}}
    print(f"  0 labels: {zero:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for k in per_class:
        n = k * classes
        t = time.perf_counter()
        picks = suggest_labels(pool_x, probs, n, seed=0)
        suggest_s = time.perf_counter() - t
        suggested, _ = trained(picks)
        centre_picks = suggest_labels(pool_x, probs, n, seed=0, within="centre")
        centre, _ = trained(centre_picks)
        random, covered = [], []
        for seed in seeds:
            draw = np.random.default_rng(seed).choice(len(pool_y), n, replace=False)
            random.append(trained(draw)[0])
            covered.append(int(len(np.unique(pool_y[draw]))))
        row["per_class"][str(k)] = {
            "n": n,
            "suggested": suggested,
            "centre": centre,
            "centre_classes_covered": int(len(np.unique(pool_y[centre_picks]))),
            "random": float(np.mean(random)),
            "random_per_seed": random,
            "random_std": float(np.std(random)),
            "suggested_classes_covered": int(len(np.unique(pool_y[picks]))),
            "random_classes_covered": float(np.mean(covered)),
            "suggest_seconds": suggest_s,
        }
        print(
            f"  {k}/class (N={n}): suggested {suggested:.3f}, centre {centre:.3f}, random {np.mean(random):.3f} +- {np.std(random):.3f} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(result: dict) -> str:
    meta, tasks = result["meta"], result["tasks"]
    ks = meta["per_class"]
    at = lambda task, k: task["per_class"][str(k)]  # noqa: E731
    lines = [
        "Target test accuracy of a head on frozen "
        f"{meta['backbone']} features after k target labels per class (N = k x classes), labelled by a simulated "
        "person with the true classes. **suggested**: the N images `xfer suggest-labels N` writes (one per k-means "
        "cluster of the unlabelled target features, the most uncertain of each under the zero-label head); "
        '**centre**: the same clusters, each one\'s image nearest its centre instead (`within="centre"`); '
        f"**random**: N drawn uniformly from the same pool, mean ± std over seeds {', '.join(map(str, meta['seeds']))}. "
        f"Every head: params.yaml's head section with method {meta['method']} (what `head.method: auto` keeps on the "
        f"digits default; a search per row would cost seven heads), selection {meta['head']['selection']}, training seed "
        f"{meta['train_seed']}: only the labelled rows differ.",
        "",
        "| task | 0 labels | " + " | ".join(f"{k}/class suggested | centre | random" for k in ks) + " |",
        "|---|---:|" + "---:|---:|---:|" * len(ks),
    ]
    for name, task in tasks.items():
        cells = [f"{task['zero_labels']:.3f}"]
        for k in ks:
            r = at(task, k)
            cells += [f"{r['suggested']:.3f}", f"{r['centre']:.3f}", f"{r['random']:.3f} ± {r['random_std']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{np.mean([t['zero_labels'] for t in tasks.values()]):.3f}"]
    for k in ks:
        cells += [f"{np.mean([at(t, k)[key] for t in tasks.values()]):.3f}" for key in ("suggested", "centre", "random")]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    cells = []
    for key in ("suggested", "centre"):
        wins = [sum(at(t, k)[key] > at(t, k)["random"] for t in tasks.values()) for k in ks]
        cells.append(f"{key} above the random mean in " + ", ".join(f"{w} of {len(tasks)} tasks at {k}/class" for w, k in zip(wins, ks)))
    k0 = ks[0]
    covered = ", ".join(
        f"{n} {at(t, k0)['suggested_classes_covered']} / {at(t, k0)['centre_classes_covered']} / {at(t, k0)['random_classes_covered']:.1f}"
        for n, t in tasks.items()
    )
    spread = np.mean([at(t, k)["random_std"] for t in tasks.values() for k in ks])
    lines += [
        "",
        f"{cells[0]}; {cells[1]}. Suggested and centre are one run each (one clustering seed, one training seed); "
        f"the random draws' spread (std, mean over cells: {spread:.3f}) is the scale of a difference that means nothing.",
        f"Classes the {k0}/class labels cover (of {next(iter(tasks.values()))['classes']}; suggested / centre / random mean): {covered}.",
        "",
        f"Machine: {meta['machine']}, {meta['threads']} torch thread(s); {meta['seconds']:.0f} s in all. Written by `benchmarks/suggest_labels.py`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(shift_tasks.TASKS))
    parser.add_argument("--per-class", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random draws")
    parser.add_argument("--method", default="mcc", help="the head's adaptation method (default: mcc)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--render", action="store_true", help="rewrite suggest_labels.md from suggest_labels.json and exit")
    args = parser.parse_args(argv)
    if args.render:
        write_text(Path(args.out) / "suggest_labels.md", markdown(json.loads((Path(args.out) / "suggest_labels.json").read_text())))
        return 0
    params = load_params(REPO / "params.yaml")
    cfg = params.head.model_copy(update={"method": args.method})
    HeadConfig.model_validate(cfg.model_dump())
    start = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        print(f"{name}: {shift_tasks.TASKS[name]}", flush=True)
        tasks[name] = run_task(name, cfg, args.per_class, args.seeds)
    meta = {
        "backbone": params.backbone.name,
        "method": args.method,
        "head": cfg.model_dump(),
        "per_class": args.per_class,
        "seeds": args.seeds,
        "train_seed": TRAIN_SEED,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
    }
    result = {"meta": meta, "tasks": tasks}
    out = Path(args.out)
    write_json(out / "suggest_labels.json", result)
    table = markdown(result)
    write_text(out / "suggest_labels.md", table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
