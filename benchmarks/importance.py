"""Importance weighting on the six shift tasks and on a covariate shift whose right weights are known.

    .venv/bin/python benchmarks/importance.py [--tasks digits printed_to_inverted ...] [--seeds 0 1 2]

For each task of benchmarks/shift_tasks.py (cached features of params.yaml's
backbone), params.yaml's head section is trained with method source_only and
with method self_training (its default knob), each with `importance_weighting`
off and on (params.yaml's `importance_max_weight`), and scored on target test.
The weights' effective sample size and the domain classifier's held-out AUC are
printed per task: they say, without target labels, how far the weights are from
uniform.

The last row is a generated covariate shift (tests/test_importance.py's: a curved
class boundary, the target where the source is thin, p(y | x) the same in both):
a linear head without weights, with the estimated weights, and with the known
density ratio. Importance weighting corrects covariate shift only; the digit
tasks also change p(y | x) in feature space, and the table shows what it does there.

No target label chooses anything: the epoch is head.selection's, the cap is
params.yaml's; target labels only score. Writes benchmarks/results/importance.{md,json}.
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
from benchmarks.imbalance import mean_std  # noqa: E402
from benchmarks.selection import machine  # noqa: E402
from xfer.config import LINEAR_PROBE, HeadConfig, load_params  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.heads import HeadData, predict_proba, train_head  # noqa: E402
from xfer.importance import clip_and_normalise, importance_weights  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
METHODS = ("source_only", "self_training")
SYNTHETIC = "covariate_shift (generated)"


def accuracy(head, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(head, x, "target").argmax(1) == y).mean())


def task_rows(name: str, params, seeds: list[int]) -> dict:
    fs = shift_tasks.task_features(name, params)
    data = head_data(fs)
    x_test, y_test = shift_tasks.target_test(fs)
    classes = int(fs.index.label.max()) + 1
    out: dict = {"accuracy": {}, "weights": {}}
    for seed in seeds:
        weights = importance_weights(data.source_train[0], data.target_train, params.head.importance_max_weight, seed)
        out["weights"][str(seed)] = weights.summary()
        for method in METHODS:
            for weighting in (False, True):
                cfg = params.head.model_copy(update={"method": method, "importance_weighting": weighting})
                start = time.perf_counter()
                head, _ = train_head(cfg, data, classes, seed)
                value = accuracy(head, x_test, y_test)
                out["accuracy"].setdefault(f"{method} {'on' if weighting else 'off'}", {})[str(seed)] = value
                print(
                    f"{name} seed {seed} {method:<14} weighting {'on ' if weighting else 'off'}: {value:.3f} ({time.perf_counter() - start:.1f} s)", flush=True
                )
    return out


def parabola_domain(n: int, centre: float, spread: float, rng: np.random.Generator):
    """label = x1 > x0^2 - 1 in both domains; only x0's distribution moves (tests/test_importance.py)."""
    x0, x1 = rng.normal(centre, spread, n), rng.normal(0, 3, n)
    return np.c_[x0, x1, rng.normal(size=(n, 2))].astype(np.float32), (x1 > x0**2 - 1).astype(np.int64)


def synthetic_rows(seeds: list[int], max_weight: float) -> dict:
    out: dict = {"accuracy": {}, "weights": {}}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        source, source_val = parabola_domain(1500, 0.0, 1.0, rng), parabola_domain(300, 0.0, 1.0, rng)
        target, test = parabola_domain(800, 1.5, 0.4, rng), parabola_domain(800, 1.5, 0.4, rng)
        x0 = source[0][:, 0]
        known = clip_and_normalise(np.exp(-((x0 - 1.5) ** 2) / (2 * 0.4**2) + x0**2 / 2), max_weight)
        out["weights"][str(seed)] = importance_weights(source[0], target[0], max_weight, seed).summary()
        base = {**LINEAR_PROBE, "epochs": 30, "lr": 0.05, "selection": "last", "importance_max_weight": max_weight}
        for label, weighting, weights in (("linear off", False, None), ("linear on", True, None), ("linear, known weights", True, known)):
            head, _ = train_head(HeadConfig(**base, importance_weighting=weighting), HeadData(source, source_val, target[0], source_weights=weights), 2, seed)
            out["accuracy"].setdefault(label, {})[str(seed)] = accuracy(head, *test)
        print(f"{SYNTHETIC} seed {seed}: " + ", ".join(f"{k} {v[str(seed)]:.3f}" for k, v in out["accuracy"].items()), flush=True)
    return out


def run(tasks: list[str], seeds: list[int]) -> dict:
    params = load_params(REPO / "params.yaml")
    rows = {name: task_rows(name, params, seeds) for name in tasks}
    rows[SYNTHETIC] = synthetic_rows(seeds, params.head.importance_max_weight)
    head = params.head.model_dump()
    return {"tasks": rows, "meta": {"seeds": seeds, "head": head, "machine": machine(), "backbone": params.backbone.name}}


def markdown(result: dict) -> str:
    meta = result["meta"]
    head = meta["head"]
    lines = [
        f"Importance weighting (`head.importance_weighting`, weights capped at {head['importance_max_weight']:g}) on frozen {meta['backbone']} features: "
        f"params.yaml's head section ({head['kind']}, selection {head['selection']}) with method source_only and self_training, each "
        f"with weighting off and on. Target test accuracy, mean ± std over seeds {', '.join(map(str, meta['seeds']))}; no target label chooses anything. "
        "ESS: the weights' effective sample size as a share of the source train rows; AUC: the held-out domain classifier's (1/2: domains alike).",
        "",
        "| task | ESS / rows | domain AUC | source_only off | source_only on | self_training off | self_training on |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    # In the tasks' own order (the .json's keys are sorted).
    for name in [t for t in shift_tasks.TASKS if t in result["tasks"]]:
        row = result["tasks"][name]
        ess = np.mean([w["effective_sample_size"] / w["rows"] for w in row["weights"].values()])
        auc = np.mean([w["domain_auc"] for w in row["weights"].values()])
        cells = [mean_std(list(row["accuracy"][f"{m} {s}"].values())) for m in ("source_only", "self_training") for s in ("off", "on")]
        lines.append(f"| {name} | {ess:.2f} | {auc:.3f} | " + " | ".join(cells) + " |")
    synthetic = result["tasks"][SYNTHETIC]
    ess = np.mean([w["effective_sample_size"] / w["rows"] for w in synthetic["weights"].values()])
    auc = np.mean([w["domain_auc"] for w in synthetic["weights"].values()])
    lines += [
        "",
        f"A generated covariate shift with known weights (2 classes, a curved boundary; ESS / rows {ess:.2f}, domain AUC {auc:.3f}), a linear head:",
        "",
        "| weights | target test accuracy |",
        "|---|---:|",
    ]
    lines += [f"| {label.removeprefix('linear').strip(' ,') or 'none'} | {mean_std(list(v.values()))} |" for label, v in synthetic["accuracy"].items()]
    lines += ["", f"Machine: {meta['machine']}. Written by `benchmarks/importance.py`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(shift_tasks.TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json, training nothing")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads((args.out / "importance.json").read_text())
    else:
        result = run(args.tasks, args.seeds)
        write_json(args.out / "importance.json", result)
    text = markdown(result)
    write_text(args.out / "importance.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
