"""The default fine-tuning over the six shift tasks: does it hold on data it was not tuned on?

    .venv/bin/python benchmarks/finetune_shifts.py [--tasks digits ...] [--seeds 0 1 2]
    .venv/bin/python benchmarks/finetune_shifts.py --render   # rewrite the .md from the .json

The fine-tuning recipe params.yaml ships (LP-FT, 8 epochs, cosine schedule,
augmentation) was found on the digits default's target test
(benchmarks/results/finetune.md): an oracle choice on one task. This script
runs params.yaml as it is on every task of benchmarks/shift_tasks.py, through
the stages' own code: the head search (xfer.head_search.search_heads, the
default head), then fine-tuning (xfer.finetune_job.run) with `finetune.method:
auto` taking that search's pick, per task and seed. Target test scores the
source-only head, the default head and the fine-tuned model (its last epoch:
`finetune.selection: last`).

Each fine-tuning epoch (epoch 0, the probe, included) is also scored by every
label-free validator and on target val during the run (its history). So the
epoch each `finetune.selection` rule would keep is replayed, and scored by
that epoch's target val accuracy: the labels only score, and target val, not
test, because the run keeps one epoch's weights, not every epoch's.

Writes benchmarks/results/finetune_shifts.{md,json}.
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
from benchmarks.selection import RESULTS, machine  # noqa: E402
from xfer import features as feats  # noqa: E402
from xfer.config import VALIDATOR_NAMES, Params, load_params  # noqa: E402
from xfer.data.split import build_manifest  # noqa: E402
from xfer.head_search import search_heads  # noqa: E402
from xfer.head_stage import head_data, pick_record  # noqa: E402
from xfer.heads import pick_epoch, predict_proba  # noqa: E402
from xfer.io import save_with, write_json, write_text  # noqa: E402
from xfer.layout import Layout  # noqa: E402

ROOTS = shift_tasks.CACHE / "finetune_shifts"
# finetune.selection rules replayed over each run's epochs: every one fine-tuning takes.
EPOCH_RULES = ("last", *(v for v in VALIDATOR_NAMES if v != "ensv"))


def task_root(name: str, params: Params) -> Layout:
    """A project root for task `name`: its manifest and published features, and its images where the
    manifest's paths (relative to shift_tasks.CACHE) point, through links into that cache."""
    fs = shift_tasks.task_features(name, params)  # builds images and features on first use
    layout = Layout(ROOTS / name)
    for rel in ("data/raw", "selection"):
        link = layout.root / rel
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(shift_tasks.CACHE / rel, target_is_directory=True)
    data = shift_tasks.task_data_config(name, params)
    manifest, _ = build_manifest(shift_tasks._dataset_dir(name, data), data, shift_tasks.SPLIT_SEED, root=shift_tasks.CACHE)
    save_with(layout.manifest, lambda tmp: manifest.to_csv(tmp, index=False))
    entry = feats.entry_dir(shift_tasks.CACHE / "features", fs.meta["key"])
    if not layout.features_current.is_dir() or feats.load_current(layout.features_current).meta["key"] != fs.meta["key"]:
        feats.publish_current(entry, layout.features_current)
    return layout


def accuracy_on_target_test(model, layout: Layout, spec) -> float:
    import torch

    from xfer.data.images import ImageRows
    from xfer.data.split import read_manifest, rows
    from xfer.finetune import predict_logits

    part = rows(read_manifest(layout.manifest), "target", "test")
    data = ImageRows(part.path.tolist(), part.label.tolist(), spec.prep(), layout.root)
    logits, labels = predict_logits(model, data, 256, torch.device("cpu"))
    return float((logits.argmax(1) == labels).mean())


def epoch_picks(history: list[dict[str, float]]) -> dict[str, float]:
    """Per finetune.selection rule, the target val accuracy of the epoch it keeps; and the best epoch's (oracle)."""
    out = {rule: history[pick_epoch(rule, history) - 1]["target_val_accuracy"] for rule in EPOCH_RULES}
    return out | {"oracle": max(r["target_val_accuracy"] for r in history)}


def evaluate_seed(name: str, params: Params, seed: int) -> dict:
    from xfer.finetune_job import run as run_finetune

    params = params.model_copy(update={"seed": seed})
    layout = task_root(name, params)
    fs = feats.load_current(layout.features_current)
    classes = int(fs.index.label.max()) + 1
    x_test, y_test = shift_tasks.target_test(fs)
    start = time.perf_counter()
    found = search_heads(params.head, head_data(fs), classes, seed)
    write_json(layout.head_pick, pick_record(found.candidate.config, params.finetune.method))
    result = run_finetune(layout, params, progress=False)
    return {
        "source_only": shift_tasks.source_only_head_accuracy(fs, params, seed),
        "head": float((predict_proba(found.model, x_test, "target").argmax(1) == y_test).mean()),
        "head_kept": found.candidate.name,
        "finetune": accuracy_on_target_test(result.model, layout, result.spec),
        "epochs": epoch_picks(result.history),
        "seconds": time.perf_counter() - start,
    }


def mean(rows: list[dict], key) -> float:
    return float(np.mean([key(r) for r in rows]))


def markdown(result: dict) -> str:
    meta, tasks = result["meta"], result["tasks"]
    order = list(shift_tasks.TASKS)
    names = sorted(tasks, key=lambda n: order.index(n) if n in order else len(order))
    per = {n: list(tasks[n]["per_seed"].values()) for n in names}
    ft = meta["finetune"]
    lines = [
        f"Target test accuracy on {len(names)} two-domain tasks (benchmarks/shift_tasks.py), mean over seeds "
        f"{', '.join(map(str, meta['seeds']))}, params.yaml as it is: the head search (method {meta['head']['method']}, "
        f"selection {meta['head']['selection']}) and fine-tuning ({ft['strategy']}, {ft['epochs']} epochs, {ft['schedule']} schedule, "
        f"augmentation, method {ft['method']}: the head's pick; the last epoch kept). The recipe was found on the digits' "
        "target test (benchmarks/results/finetune.md); the other five tasks had no say in it.",
        "",
        "| task | source-only head | head (default) | fine-tuned (default) | fine-tuned - head | fine-tuned - source-only | head kept |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for n in names:
        rows = per[n]
        so, head, fine = mean(rows, lambda r: r["source_only"]), mean(rows, lambda r: r["head"]), mean(rows, lambda r: r["finetune"])
        kept = ", ".join(sorted({r["head_kept"] for r in rows}))
        lines.append(f"| {n} | {so:.3f} | {head:.3f} | {fine:.3f} | {fine - head:+.3f} | {fine - so:+.3f} | {kept} |")
    every = [r for n in names for r in per[n]]
    so, head, fine = mean(every, lambda r: r["source_only"]), mean(every, lambda r: r["head"]), mean(every, lambda r: r["finetune"])
    lines.append(f"| **mean** | {so:.3f} | {head:.3f} | {fine:.3f} | {fine - head:+.3f} | {fine - so:+.3f} | |")
    rules = [*EPOCH_RULES, "oracle"]
    lines += [
        "",
        "Which fine-tuning epoch to keep (`finetune.selection`): the target val accuracy of the epoch each rule keeps "
        "(epochs 0, the probe, to the last), mean over seeds; target val labels only score it. **oracle**: the best epoch on target val.",
        "",
        "| task | " + " | ".join(rules) + " |",
        "|---|" + "---:|" * len(rules),
    ]
    for n in names + ["mean"]:
        rows = every if n == "mean" else per[n]
        label = "**mean**" if n == "mean" else n
        lines.append(f"| {label} | " + " | ".join(f"{mean(rows, lambda r, k=k: r['epochs'][k]):.3f}" for k in rules) + " |")
    lines += ["", f"Machine: {meta['machine']}; {meta['seconds']:.0f} s in all. Written by `benchmarks/finetune_shifts.py`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(shift_tasks.TASKS), help=f"from {list(shift_tasks.TASKS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--render", action="store_true", help="rewrite finetune_shifts.md from finetune_shifts.json and exit")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        write_text(out / "finetune_shifts.md", markdown(json.loads((out / "finetune_shifts.json").read_text())))
        return 0
    unknown = [t for t in args.tasks if t not in shift_tasks.TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(shift_tasks.TASKS)}")
    params = load_params(args.params)
    start = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        per_seed = {}
        for seed in args.seeds:
            row = per_seed[str(seed)] = evaluate_seed(name, params, seed)
            print(
                f"{name} seed {seed}: source-only {row['source_only']:.3f} head {row['head']:.3f} ({row['head_kept']}) "
                f"fine-tuned {row['finetune']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
        tasks[name] = {"per_seed": per_seed, "description": shift_tasks.TASKS[name]}
    meta = {
        "seeds": args.seeds,
        "head": params.head.model_dump(),
        "finetune": params.finetune.model_dump(mode="json"),
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    result = {"meta": meta, "tasks": tasks}
    write_json(out / "finetune_shifts.json", result)
    table = markdown(result)
    write_text(out / "finetune_shifts.md", table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
