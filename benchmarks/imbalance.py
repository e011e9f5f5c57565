"""Class imbalance in the source: loss weighting, resampling, both, or neither, on a long-tailed digits default.

    .venv/bin/python benchmarks/imbalance.py [--ratios 10 100] [--seeds 0 1 2]

The digits default's cached features (benchmarks/shift_tasks.py, task digits)
with its source train and source val rows cut to a long tail: class c keeps
round(n * ratio ** (-c / 9)) of its n rows (at least one), so digit 0 keeps
all and digit 9 a ratio-th; which rows stay is seeded. The target (unlabelled
train rows, and the test rows scored) is as it is. The head is params.yaml's
head section (method auto: the label-free search) with, per variant:

- none: `class_balanced: false`, `sampler: uniform`;
- loss: `class_balanced: true` (the loss weighted by inverse class frequency);
- resampling: `sampler: class_balanced` (each class drawn equally often);
- both: the two together.

Printed per ratio and variant, mean ± std over the seeds: target test accuracy,
macro F1 and the worst class's recall. No target label chooses anything here:
they only score. Writes benchmarks/results/imbalance.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks  # noqa: E402
from benchmarks.selection import machine  # noqa: E402
from xfer.config import HeadConfig, load_params  # noqa: E402
from xfer.head_search import search_heads  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.heads import HeadData, predict_proba, train_head  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402
from xfer.metrics import classification_metrics, confusion_matrix, per_class_accuracy  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
VARIANTS = {
    "none": {"class_balanced": False, "sampler": "uniform"},
    "loss": {"class_balanced": True, "sampler": "uniform"},
    "resampling": {"class_balanced": False, "sampler": "class_balanced"},
    "both": {"class_balanced": True, "sampler": "class_balanced"},
}


def long_tail(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Positions of the rows kept: class c keeps round(n_c * ratio ** (-c / (classes - 1))), at least one."""
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    kept = []
    for c in range(classes):
        rows = np.flatnonzero(labels == c)
        keep = max(1, round(rows.size * ratio ** (-c / (classes - 1))))
        kept.append(np.sort(rng.choice(rows, keep, replace=False)))
    return np.concatenate(kept)


def long_tailed_data(data: HeadData, ratio: float, seed: int) -> HeadData:
    (xs, ys), (xv, yv) = data.source_train, data.source_val
    train, val = long_tail(ys, ratio, seed), long_tail(yv, ratio, seed + 1000)
    return HeadData((xs[train], ys[train]), (xv[val], yv[val]), data.target_train, data.target_val, data.target_labeled)


def train(cfg: HeadConfig, data: HeadData, num_classes: int, seed: int):
    """The head stage's choice: the search with method auto, else one head."""
    if cfg.method == "auto":
        return search_heads(cfg, data, num_classes, seed).model
    return train_head(cfg, data, num_classes, seed)[0]


def scored(head, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    predicted = predict_proba(head, x, "target").argmax(1)
    figures = classification_metrics(y, predicted, num_classes)
    return {
        "accuracy": figures["accuracy"],
        "macro_f1": figures["macro_f1"],
        "worst_recall": float(per_class_accuracy(confusion_matrix(y, predicted, num_classes)).min()),
    }


def run(ratios: list[float], seeds: list[int]) -> dict:
    params = load_params(REPO / "params.yaml")
    fs = shift_tasks.task_features("digits", params)
    data = head_data(fs)
    x_test, y_test = shift_tasks.target_test(fs)
    num_classes = int(fs.index.label.max()) + 1
    rows: dict = {}
    for ratio in ratios:
        for seed in seeds:
            tailed = long_tailed_data(data, ratio, seed)
            counts = np.bincount(tailed.source_train[1], minlength=num_classes).tolist()
            for variant, overrides in VARIANTS.items():
                cfg = params.head.model_copy(update=overrides)
                start = time.perf_counter()
                figures = scored(train(cfg, tailed, num_classes, seed), x_test, y_test, num_classes)
                rows.setdefault(str(ratio), {}).setdefault(variant, {})[str(seed)] = figures | {"seconds": time.perf_counter() - start}
                print(
                    f"ratio {ratio:g} seed {seed} {variant:<10} source train per class {counts}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()),
                    flush=True,
                )
    return {
        "ratios": rows,
        "meta": {"seeds": seeds, "head": params.head.model_dump(), "machine": machine(), "backbone": params.backbone.name},
    }


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    head = meta["head"]
    lines = [
        f"Class imbalance in the source: the digits default on frozen {meta['backbone']} features with its source train and val cut to a "
        f"long tail (digit c keeps ratio^(-c/9) of its rows: digit 0 all, digit 9 a ratio-th), the target as it is. Head: params.yaml's "
        f"head section (method {head['method']}, selection {head['selection']}) with the variant's `class_balanced` and `sampler`. "
        f"Target test, mean ± std over seeds {', '.join(map(str, meta['seeds']))}; no target label chooses anything.",
        "",
        "| imbalance ratio | variant | accuracy | macro F1 | worst-class recall |",
        "|---:|---|---:|---:|---:|",
    ]
    for ratio, variants in result["ratios"].items():
        for variant, by_seed in variants.items():
            cells = [mean_std([r[k] for r in by_seed.values()]) for k in ("accuracy", "macro_f1", "worst_recall")]
            lines.append(f"| {float(ratio):g} | {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "none: `class_balanced: false`, `sampler: uniform`; loss: `class_balanced: true`; resampling: `sampler: class_balanced`; both: the two.",
        "",
        f"Machine: {meta['machine']}. Written by `benchmarks/imbalance.py`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.ratios, args.seeds)
    write_json(args.out / "imbalance.json", result)
    text = markdown(result)
    write_text(args.out / "imbalance.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
