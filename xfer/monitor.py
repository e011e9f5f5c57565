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
from xfer.drift.ood import NearestNeighbourOOD
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
    # The per-image flag's scorer; None for a window saved before it existed.
    ood: NearestNeighbourOOD | None = None


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
    ood = NearestNeighbourOOD.calibrate(features, quantile=cfg.ood_quantile)
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
        "ood": ood.as_meta(),
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
        ood = NearestNeighbourOOD.from_meta(window.features, meta["ood"]) if "ood" in meta else None
    except (OSError, ValueError, KeyError, DriftError) as err:
        raise MonitorError(f"the model's reference window in {folder} cannot be read ({err}); run the evaluate stage again") from None
    if meta.get("format") != REFERENCE_FORMAT:
        raise MonitorError(f"the reference window in {folder} has format {meta.get('format')}, this xfer reads {REFERENCE_FORMAT}")
    return Reference(window, threshold, meta, ood)


class EmbeddingCache:
    """What one model made of images it embedded before, by image content.

    <folder>/<model key>/<chunk>.npz, one chunk per run that embedded anything
    (the images' sha256, features, probabilities), each written whole; a chunk
    that cannot be read is passed over (its images are embedded again). The
    model key names one logged model (tasks/monitor.py: its MLflow model uuid),
    never an alias, which moves."""

    def __init__(self, folder: Path, model_key: str):
        self.dir = Path(folder) / model_key

    def lookup(self, digests: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        import zipfile

        wanted, found = set(digests), {}
        for chunk in sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []:
            try:
                with np.load(chunk, allow_pickle=False) as z:
                    keys, features, probabilities = z["digests"], z["features"], z["probabilities"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                continue
            for i, digest in enumerate(keys.tolist()):
                if digest in wanted and digest not in found:
                    found[digest] = (features[i], probabilities[i])
        return found

    def add(self, digests: Sequence[str], features: np.ndarray, probabilities: np.ndarray) -> Path | None:
        import os
        import time

        from xfer.io import save_with

        if not len(digests):
            return None

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, digests=np.array(list(digests)), features=features.astype(np.float32), probabilities=probabilities.astype(np.float32))

        return save_with(self.dir / f"{time.time_ns()}-{os.getpid()}.npz", save)


def embed(predictor, images: Sequence[Path], batch_size: int, on_batch, cache: EmbeddingCache | None) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """(features, probabilities, each image's sha256 (with a cache), the rows embedded now)."""
    if cache is None:
        features, probabilities = predictor.predict_with_features(list(images), batch_size, on_batch=on_batch)
        return features, probabilities, [], list(range(len(images)))
    from xfer.io import sha256_file

    digests = [sha256_file(p) for p in images]
    held = cache.lookup(digests)
    missing = [i for i, d in enumerate(digests) if d not in held]
    if on_batch is not None and len(images) > len(missing):
        on_batch(len(images) - len(missing))
    computed = {}
    if missing:
        features, probabilities = predictor.predict_with_features([images[i] for i in missing], batch_size, on_batch=on_batch)
        computed = {digests[i]: (f, p) for i, f, p in zip(missing, features, probabilities)}
    merged = [held[d] if d in held else computed[d] for d in digests]
    return np.stack([f for f, _ in merged]).astype(np.float32), np.stack([p for _, p in merged]).astype(np.float32), digests, missing


def monitor_images(
    predictor,
    reference: Reference,
    images: Sequence[Path],
    cfg: MonitorConfig,
    seed: int,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    cache: EmbeddingCache | None = None,
) -> tuple[dict, Window]:
    """Compare `images` with the reference window: (the report, the new window). With a cache,
    only images whose content the model never embedded before are embedded."""
    if len(images) < 5:
        raise MonitorError(f"{len(images)} new image(s): drift needs at least 5 to test")
    features, probabilities, digests, embedded = embed(predictor, list(images), batch_size, on_batch, cache)
    new = Window(features, probabilities)
    if new.features.shape[1] != reference.window.features.shape[1]:
        raise MonitorError(
            f"the model's features have {new.features.shape[1]} dims, its reference window {reference.window.features.shape[1]}: the reference is not this model's"
        )
    if cache is not None and embedded:
        first = list({digests[i]: i for i in reversed(embedded)}.values())  # one row per content
        cache.add([digests[i] for i in first], features[first], probabilities[first])
    per_test_alpha = cfg.alpha / len(DRIFT_TEST_NAMES)
    results = run_tests(reference.window, new, alpha=per_test_alpha, seed=seed)
    estimate = reference.threshold.estimate(new.probabilities)
    baseline = reference.threshold.calibration_accuracy
    drift = any(r.drift for r in results.values())
    drop = baseline - estimate
    report = {
        "images": len(new),
        "embedded": len(embedded),  # the rest came from the cache
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
        **({} if reference.ood is None else {"ood": ood_summary(reference.ood, new.features)}),
        "retrain_wanted": bool(drift and (cfg.max_drop is None or drop > cfg.max_drop)),
    }
    return report, new


OOD_SCORE_COLUMN = "ood_score"
OOD_FLAG_COLUMN = "out_of_distribution"


def ood_summary(ood: NearestNeighbourOOD, features) -> dict:
    """How many new images the per-image flag marks, against the share expected of in-domain images."""
    _, flags = ood.flags(features)
    return {"flagged": int(flags.sum()), "share": float(flags.mean()), "expected_share": round(1 - ood.quantile, 6), "threshold": ood.threshold}


def with_ood_columns(frame: pd.DataFrame, ood: NearestNeighbourOOD, features) -> pd.DataFrame:
    """A prediction frame with each image's OOD score and flag as its last two columns."""
    scores, flags = ood.flags(features)
    return frame.assign(**{OOD_SCORE_COLUMN: scores, OOD_FLAG_COLUMN: flags})


def summary_line(report: dict) -> str:
    """One line for people: the verdict, each test's p-value, the accuracy estimate."""
    verdict = "DRIFT" if report["drift"] else "no drift"
    tests = ", ".join(f"{name} p={t['p_value']:.3g}" for name, t in report["tests"].items())
    accuracy = report["accuracy"]
    retrain = "; retraining wanted" if report["retrain_wanted"] else ""
    ood = report.get("ood")
    flagged = f"; {ood['flagged']} flagged out of distribution (about {ood['expected_share']:.0%} of in-domain images are)" if ood else ""
    return (
        f"{verdict} in {report['images']} images against {report['reference_rows']} reference rows "
        f"(alpha {report['alpha']}, {report['alpha_per_test']:.3g} per test: {tests}); estimated accuracy "
        f"{accuracy['estimate']:.3f} against {accuracy['target_val']:.3f} on target val (drop {accuracy['drop']:+.3f}, max {report['max_drop']}){flagged}{retrain}"
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
        "ood_share": report["ood"]["share"] if "ood" in report else float("nan"),
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


# ---- the monitor flow: which incoming images are new, and whether a retrain is triggered ----

CHECKED_FILE = "checked.csv"
TRIGGER_FILE = "trigger.json"
EMBEDDINGS_DIR = "embeddings"


def unchecked(images: Sequence[Path], checked_csv: Path) -> tuple[list[Path], list[str]]:
    """The images whose content no earlier monitor run tested (checked.csv), each content once, and their sha256."""
    from xfer.io import sha256_file

    seen = set(pd.read_csv(checked_csv, dtype=str).sha256) if Path(checked_csv).is_file() else set()
    new, digests = [], []
    for path in images:
        digest = sha256_file(path)
        if digest not in seen:
            seen.add(digest)
            new.append(Path(path))
            digests.append(digest)
    return new, digests


def record_checked(checked_csv: Path, images: Sequence[Path], digests: Sequence[str], when: str) -> Path:
    """Append the tested images (sha256, path, time) to checked.csv, written whole."""
    from xfer.plots import write_rows_csv

    previous = pd.read_csv(checked_csv, dtype=str).to_dict("records") if Path(checked_csv).is_file() else []
    return write_rows_csv(checked_csv, [*previous, *({"sha256": d, "path": str(p), "time": when} for p, d in zip(images, digests))])


@dataclass(frozen=True)
class TriggerDecision:
    trigger: bool
    reason: str


def trigger_decision(report: dict, cfg: MonitorConfig, pool: str | None, last: dict | None, now) -> TriggerDecision:
    """Whether the images of `report` go to the target pool and a retrain runs now.

    Only when retraining is wanted (drift and an estimated drop above max_drop),
    there is a pool to put the images in, and the last triggered retrain (`last`,
    trigger.json) is at least monitor.cooldown_hours old."""
    import datetime as dt

    accuracy = report["accuracy"]
    if not report["retrain_wanted"]:
        why = "no drift" if not report["drift"] else f"drift, but the estimated drop {accuracy['drop']:+.3f} is within monitor.max_drop {cfg.max_drop}"
        return TriggerDecision(False, f"no retrain wanted: {why}")
    wanted = (
        "drift (monitor.max_drop null: whatever the accuracy estimate)"
        if cfg.max_drop is None
        else f"drift, and the estimated accuracy dropped by {accuracy['drop']:.3f} > monitor.max_drop {cfg.max_drop}"
    )
    if pool is None:
        return TriggerDecision(False, f"retraining wanted ({wanted}), not triggered: data.split.target_pool is not set, so the new images have no pool to join")
    if last is not None:
        since = now - dt.datetime.fromisoformat(last["time"])
        if since < dt.timedelta(hours=cfg.cooldown_hours):
            return TriggerDecision(
                False,
                f"retraining wanted ({wanted}), not triggered: the last triggered retrain was at {last['time']}, "
                f"{since.total_seconds() / 3600:.2f} h ago, within monitor.cooldown_hours {cfg.cooldown_hours}",
            )
    return TriggerDecision(True, f"retrain triggered: {wanted}")


def add_to_pool(images: Sequence[Path], pool_folder: Path, batch: str) -> list[Path]:
    """Copy `images` into `pool_folder`/`batch`/, each named by its content, the batch whole or not
    at all; an image whose content the pool already holds is not copied again. The new files."""
    import shutil

    from xfer.data.split import pool_images
    from xfer.io import sha256_file

    pool_folder = Path(pool_folder)
    held = {p.stem for p in pool_images(pool_folder)} if pool_folder.is_dir() else set()
    wanted: dict[str, Path] = {}
    for path in images:
        digest = sha256_file(path)
        if digest not in held:
            wanted.setdefault(digest, Path(path))
    if not wanted:
        return []
    dest = pool_folder / batch
    if dest.exists():
        raise MonitorError(f"{dest} exists already: a pool batch is never rewritten")
    with atomic_dir(dest) as tmp:
        for digest, path in wanted.items():
            shutil.copyfile(path, tmp / f"{digest}{path.suffix.lower()}")
    return sorted(dest / f"{d}{p.suffix.lower()}" for d, p in wanted.items())
