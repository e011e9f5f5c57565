"""Watch a served model's target domain: its reference window, and drift in new images.

When evaluate registers a model it saves, inside the model's bundle
(xfer/predictor.py), the *reference window*: what the model makes of target
images it never trained on (target val, up to `monitor.reference_rows`,
seeded), its backbone features and its class probabilities, and the ATC
confidence threshold calibrated on the same target val rows (which reads their
labels, once: meta.json says so). Not the unlabelled target rows the model was
adapted to: its predictions on those are surer than on any new image of the
same domain (it trained on them), and the per-class KS test finds that
difference every time (benchmarks/drift.py measured it: 100% false alarms at
300 images).

    <bundle>/reference/features.npy       (rows, dim) float32
    <bundle>/reference/probabilities.npy  (rows, classes) float32
    <bundle>/reference/meta.json          rows, split, threshold, its calibration

`monitor_images` embeds new images with the same model, runs every drift test
(xfer/drift/) against the reference window, estimates the model's accuracy on
them without labels, and says whether retraining is wanted: drift significant
(any test below alpha / the number of tests, so that the three together keep
the level alpha) and the estimated accuracy below target val's by more than
`monitor.max_drop`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from xfer.config import MonitorConfig
from xfer.data.split import rows
from xfer.drift import DRIFT_TEST_NAMES, DriftError, Window, run_tests
from xfer.drift.accuracy import ConfidenceThreshold, calibrate
from xfer.io import atomic_dir, write_json

REFERENCE_DIR = "reference"
FEATURES_FILE = "features.npy"
PROBABILITIES_FILE = "probabilities.npy"
META_FILE = "meta.json"
# Bumped when the reference files change meaning.
REFERENCE_FORMAT = 1


class MonitorError(ValueError):
    """New images or a model the monitor cannot use; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Reference:
    window: Window
    threshold: ConfidenceThreshold
    meta: dict


def reference_rows(manifest: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """Target rows no model trained or chose an epoch on (target val), at most `max_rows`, seeded."""
    pool = rows(manifest, "target", "val")
    if len(pool) > max_rows:
        pool = pool.sample(n=max_rows, random_state=seed).sort_index()
    return pool


def write_reference(
    bundle_dir: Path,
    predictor,
    images_root: Path,
    manifest: pd.DataFrame,
    cfg: MonitorConfig,
    seed: int,
    batch_size: int = 64,
) -> dict:
    """Save the reference window and the ATC threshold into `bundle_dir`/reference (whole or not at all); its meta."""
    calibration = rows(manifest, "target", "val")
    reference = reference_rows(manifest, cfg.reference_rows, seed)
    if len(reference) < 5:
        raise MonitorError(f"a reference window needs at least 5 target val rows; the split has {len(reference)}")
    # One pass over target val: the window is a sample of those rows, the threshold is calibrated on all of them.
    all_features, all_probabilities = predictor.predict_with_features([Path(images_root) / p for p in calibration.path], batch_size)
    picked = calibration.index.get_indexer(reference.index)
    features, probabilities = all_features[picked], all_probabilities[picked]
    threshold = calibrate(all_probabilities, calibration.label.to_numpy())
    meta = {
        "format": REFERENCE_FORMAT,
        "rows": len(reference),
        "split": "target val (the window reads no label)",
        "seed": seed,
        "dim": int(features.shape[1]),
        "classes": int(probabilities.shape[1]),
        "accuracy_estimate": {
            "method": "average thresholded confidence (ATC)",
            "threshold": threshold.threshold,
            "calibrated_on": "target val",
            "uses_target_labels": True,
            "calibration_accuracy": threshold.calibration_accuracy,
            "calibration_rows": threshold.calibration_rows,
        },
    }
    with atomic_dir(Path(bundle_dir) / REFERENCE_DIR) as tmp:
        np.save(tmp / FEATURES_FILE, features.astype(np.float32))
        np.save(tmp / PROBABILITIES_FILE, probabilities.astype(np.float32))
        write_json(tmp / META_FILE, meta)
    return meta


def read_reference(bundle_dir: Path) -> Reference:
    """The bundle's reference window; MonitorError naming what to do when it has none or it is damaged."""
    folder = Path(bundle_dir) / REFERENCE_DIR
    if not (folder / META_FILE).is_file():
        raise MonitorError(
            f"the model has no reference window ({folder} is missing): it was registered before xfer saved one; "
            "run the evaluate stage again (dvc repro -f -s evaluate) to register a model that has it"
        )
    try:
        meta = json.loads((folder / META_FILE).read_text())
        window = Window(np.load(folder / FEATURES_FILE, allow_pickle=False), np.load(folder / PROBABILITIES_FILE, allow_pickle=False))
        estimate = meta["accuracy_estimate"]
        threshold = ConfidenceThreshold(float(estimate["threshold"]), float(estimate["calibration_accuracy"]), int(estimate["calibration_rows"]))
    except (OSError, ValueError, KeyError, DriftError) as err:
        raise MonitorError(f"the model's reference window in {folder} cannot be read ({err}); run the evaluate stage again") from None
    if meta.get("format") != REFERENCE_FORMAT:
        raise MonitorError(f"the reference window in {folder} has format {meta.get('format')}, this xfer reads {REFERENCE_FORMAT}")
    return Reference(window, threshold, meta)


def monitor_images(
    predictor,
    reference: Reference,
    images: Sequence[Path],
    cfg: MonitorConfig,
    seed: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict, Window]:
    """Compare `images` with the reference window: (the report, the new window)."""
    if len(images) < 5:
        raise MonitorError(f"{len(images)} new image(s): drift needs at least 5 to test")
    features, probabilities = predictor.predict_with_features(list(images), batch_size, on_batch=on_batch)
    new = Window(features, probabilities)
    if new.features.shape[1] != reference.window.features.shape[1]:
        raise MonitorError(
            f"the model's features have {new.features.shape[1]} dims, its reference window {reference.window.features.shape[1]}: the reference is not this model's"
        )
    per_test_alpha = cfg.alpha / len(DRIFT_TEST_NAMES)
    results = run_tests(reference.window, new, alpha=per_test_alpha, seed=seed)
    estimate = reference.threshold.estimate(new.probabilities)
    baseline = reference.threshold.calibration_accuracy
    drift = any(r.drift for r in results.values())
    drop = baseline - estimate
    report = {
        "images": len(new),
        "reference_rows": len(reference.window),
        "drift": drift,
        "alpha": cfg.alpha,
        "alpha_per_test": per_test_alpha,
        "tests": {name: r.as_dict() for name, r in results.items()},
        "accuracy": {
            "estimate": estimate,
            "target_val": baseline,
            "drop": drop,
            "method": "average thresholded confidence (ATC), calibrated on target val (reads its labels)",
        },
        "max_drop": cfg.max_drop,
        "retrain_wanted": bool(drift and drop > cfg.max_drop),
    }
    return report, new


def summary_line(report: dict) -> str:
    """One line for people: the verdict, each test's p-value, the accuracy estimate."""
    verdict = "DRIFT" if report["drift"] else "no drift"
    tests = ", ".join(f"{name} p={t['p_value']:.3g}" for name, t in report["tests"].items())
    accuracy = report["accuracy"]
    retrain = "; retraining wanted" if report["retrain_wanted"] else ""
    return (
        f"{verdict} in {report['images']} images against {report['reference_rows']} reference rows "
        f"(alpha {report['alpha']}, {report['alpha_per_test']:.3g} per test: {tests}); estimated accuracy "
        f"{accuracy['estimate']:.3f} against {accuracy['target_val']:.3f} on target val (drop {accuracy['drop']:+.3f}, max {report['max_drop']}){retrain}"
    )


REPORT_FILE = "report.json"
HISTORY_FILE = "history.csv"
PROJECTION_PLOT = "projection.png"
HISTORY_PLOT = "history.png"


def history_row(report: dict, when: str, model: str) -> dict:
    row = {"time": when, "model": model, "images": report["images"], "drift": report["drift"]}
    for name, test in report["tests"].items():
        row[f"{name}_p_value"] = test["p_value"]
        row[f"{name}_statistic"] = test["statistic"]
    row |= {
        "accuracy_estimate": report["accuracy"]["estimate"],
        "accuracy_target_val": report["accuracy"]["target_val"],
        "retrain_wanted": report["retrain_wanted"],
    }
    return row


def write_outputs(out_dir: Path, report: dict, reference: Reference, new: Window, when: str, model: str) -> dict[str, Path]:
    """report.json (this run), history.csv (a row per run, this one appended) and the two plots, each written whole."""
    from xfer.plots import drift_history_figure, drift_projection_figure, save_figure, write_rows_csv

    out_dir = Path(out_dir)
    history_path = out_dir / HISTORY_FILE
    previous = pd.read_csv(history_path, keep_default_na=False).to_dict("records") if history_path.is_file() else []
    rows_so_far = [*previous, history_row(report, when, model)]
    paths = {
        "report": write_json(out_dir / REPORT_FILE, {"time": when, "model": model, **report}),
        "history": write_rows_csv(history_path, rows_so_far),
        "projection": save_figure(
            out_dir / PROJECTION_PLOT,
            drift_projection_figure(reference.window.features, new.features, f"{model}\nreference window vs {len(new)} new images, {when}"),
        ),
        "history_plot": save_figure(out_dir / HISTORY_PLOT, drift_history_figure(rows_so_far, list(report["tests"]), report["alpha_per_test"])),
    }
    return paths
