"""Do the transferability scores rank backbones as their heads' target test accuracy does?

    python benchmarks/rank.py [--tasks digits handwritten_to_printed printed_to_inverted] [--seed 0]

For each two-domain task of benchmarks/shift_tasks.py and each candidate
backbone (every one whose pretrained weights ship with xfer, and the first
of them with random weights as a control), at params.yaml's image size:
the backbone's features of the task (the benchmark's feature cache), the
four scores `xfer rank` prints (xfer/transferability/), and the target test
accuracy of params.yaml's head trained on those features (what a user who
picked that backbone would get from the head stage). Then, per task, each
score's Spearman correlation with that accuracy over the candidates, and
the recommended backbone's accuracy against the best one's.

Target test labels are read only to score the heads afterwards; the scores
and the recommendation never see them.

Writes benchmarks/results/rank.{md,json}; the json lists the candidates
under `backbones` and holds every row under `tasks.<task>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks  # noqa: E402
from benchmarks.selection import machine, spearman  # noqa: E402
from xfer.config import Params, load_params  # noqa: E402
from xfer.head_search import search_heads  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.heads import predict_proba, train_head  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402
from xfer.rank import candidate_name, offline_candidates, score_inputs  # noqa: E402
from xfer.transferability import RULE, SCORE_NAMES, rank_table, recommend  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_TASKS = ["digits", "handwritten_to_printed", "printed_to_inverted"]


def head_accuracy(fs, params: Params, seed: int) -> float:
    """Target test accuracy of params.yaml's head section (a search when head.method is auto) on `fs`."""
    num_classes = int(fs.index.label.max()) + 1
    data = head_data(fs)
    if params.head.method == "auto":
        model = search_heads(params.head, data, num_classes, seed).model
    else:
        model, _ = train_head(params.head, data, num_classes, seed)
    x, y = shift_tasks.target_test(fs)
    return float((predict_proba(model, x, "target").argmax(1) == y).mean())


def run_task(name: str, params: Params, seed: int) -> dict:
    candidates = offline_candidates(params.backbone.image_size)
    inputs, accuracy, seconds = {}, {}, {}
    for backbone in candidates:
        label = candidate_name(backbone)
        start = time.perf_counter()
        fs = shift_tasks.task_features(name, params.model_copy(update={"backbone": backbone}))
        inputs[label] = score_inputs(fs)
        accuracy[label] = head_accuracy(fs, params, seed)
        seconds[label] = time.perf_counter() - start
    rows = rank_table(inputs, seed)
    for row in rows:
        row["head_target_test_accuracy"] = accuracy[row["candidate"]]
    recommended, _ = recommend(rows)
    acc = np.array([row["head_target_test_accuracy"] for row in rows])
    best = rows[int(acc.argmax())]["candidate"]
    result = {
        "rows": rows,
        "spearman": {s: spearman(np.array([row[s] for row in rows]), acc) for s in SCORE_NAMES},
        "recommended": recommended,
        "recommended_accuracy": accuracy[recommended],
        "best": best,
        "best_accuracy": accuracy[best],
        "seconds": seconds,
    }
    print(
        f"{name}: recommended {recommended} ({accuracy[recommended]:.3f}), best {best} ({accuracy[best]:.3f}); Spearman "
        + ", ".join(f"{s} {v:+.2f}" for s, v in result["spearman"].items()),
        flush=True,
    )
    return result


def markdown(result: dict) -> str:
    meta, tasks = result["meta"], result["tasks"]
    lines = [
        "# Transferability before training: each score against the head's target test accuracy",
        "",
        f"`{meta['command']}`; {meta['machine']}; seed {meta['seed']}. Candidates: {', '.join(result['backbones'])}. "
        f"Head: params.yaml's head section (method {meta['head']['method']}, selection {meta['head']['selection']}) on each backbone's frozen features. "
        "Target test labels score the heads afterwards; no score and no recommendation reads them.",
        "",
        "| task | " + " | ".join(f"Spearman {s}" for s in SCORE_NAMES) + " | recommended (accuracy) | best (accuracy) |",
        "|---|" + "---:|" * len(SCORE_NAMES) + "---|---|",
    ]
    for name, task in tasks.items():
        cells = [f"{task['spearman'][s]:+.2f}" for s in SCORE_NAMES]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {task['recommended']} ({task['recommended_accuracy']:.3f}) | {task['best']} ({task['best_accuracy']:.3f}) |"
        )
    means = [f"{np.mean([t['spearman'][s] for t in tasks.values()]):+.2f}" for s in SCORE_NAMES]
    rec = np.mean([t["recommended_accuracy"] for t in tasks.values()])
    best = np.mean([t["best_accuracy"] for t in tasks.values()])
    lines.append("| **mean** | " + " | ".join(means) + f" | {rec:.3f} | {best:.3f} |")
    lines += ["", "Every candidate, every task (scores; head = the head's target test accuracy):", ""]
    lines += ["| task | candidate | " + " | ".join(SCORE_NAMES) + " | head |", "|---|---|" + "---:|" * (len(SCORE_NAMES) + 1)]
    for name, task in tasks.items():
        for row in task["rows"]:
            lines.append(
                f"| {name} | {row['candidate']} | " + " | ".join(f"{row[s]:.4f}" for s in SCORE_NAMES) + f" | {row['head_target_test_accuracy']:.3f} |"
            )
    lines += ["", f"Rule: {RULE}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(shift_tasks.TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    tasks = {name: run_task(name, params, args.seed) for name in args.tasks}
    result = {
        "meta": {
            "command": "python benchmarks/rank.py" + (f" --tasks {' '.join(args.tasks)}" if args.tasks != DEFAULT_TASKS else ""),
            "machine": machine(),
            "seed": args.seed,
            "head": {"method": params.head.method, "selection": params.head.selection},
        },
        "backbones": [candidate_name(b) for b in offline_candidates(params.backbone.image_size)],
        "tasks": tasks,
    }
    out = Path(args.out)
    write_json(out / "rank.json", result)
    text = markdown(result)
    write_text(out / "rank.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
