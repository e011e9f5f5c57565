"""`finetune.cv: true`: the fine-tuning recipe cross-validated, one full run per fold of `evaluate.cv_folds`.

The folds are the head's (xfer/cross_validation.py: the labelled training rows,
stratified by domain and class, dealt with the params seed). For fold i, a
manifest of its own says what fine-tuning sees: the rows of the other folds but
fold i + 1 are source train (source rows) and the labelled target budget (target
rows); fold i + 1's source rows are source val, where the recipe's selection
reads its epoch; fold i and fold i + 1's target rows are in splits no stage
reads (HELD_OUT, UNUSED). Unlabelled target rows, target val and target test
keep their splits, so adaptation and the label-free validators see what the
finetune stage sees, and target test is in no fold.

Each fold runs the finetune stage's own code (xfer/finetune_job.py) in a
temporary project under `work_dir`: that manifest, the cached features
relabelled to it (the same numbers), and the images where they are. Its model
is scored on its held-out rows and on target test; the figures are reported
as mean and std over the folds, as the head's are. The runs are full
fine-tunings: k times the finetune stage's time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from xfer import features as feats
from xfer.config import Params
from xfer.cross_validation import CV_METRICS, Folds, make_folds, scores, summary
from xfer.data.images import ImageRows
from xfer.data.split import rows
from xfer.finetune import predict_logits, select_device
from xfer.finetune_job import run as run_finetune
from xfer.io import save_with
from xfer.layout import Layout
from xfer.metrics import softmax

# Splits a fold's manifest gives rows that no stage reads: the held-out fold, and the
# epoch-choosing fold's target rows (its source rows are source val).
HELD_OUT = "cv_held_out"
UNUSED = "cv_unused"


def fold_manifest(manifest: pd.DataFrame, folds: Folds, held_out: int) -> pd.DataFrame:
    """The manifest fine-tuning fold `held_out` sees (rows in the same order, only `split` changed)."""
    validation = (held_out + 1) % folds.k
    split = manifest.split.to_numpy().copy()
    role = manifest.role.to_numpy()
    for pos, fold in zip(folds.rows, folds.fold):
        if fold == held_out:
            split[pos] = HELD_OUT
        elif fold == validation:
            split[pos] = "val" if role[pos] == "source" else UNUSED
        else:
            split[pos] = "train"
    return manifest.assign(split=split)


def fold_project(root: Path, manifest: pd.DataFrame, fs: feats.FeatureSet, images_root: Path) -> Layout:
    """A project at `root` for one fold: its manifest (image paths made absolute, so the images are
    read where they are) and the features, relabelled to it, published as the features stage would."""
    layout = Layout(root)
    absolute = manifest.assign(path=[str((Path(images_root) / p).resolve()) for p in manifest.path])
    save_with(layout.manifest, lambda tmp: absolute.to_csv(tmp, index=False))
    meta = {k: v for k, v in fs.meta.items() if k in ("backbone", "weights_digest", "preprocessing", "compute")}
    dtype = "float16" if fs.features.dtype == np.float16 else "float32"
    entry = feats.write_entry(root / "feature-cache", f"{fs.meta.get('key', 'features')}-fold", np.asarray(fs.features), absolute, meta, dtype)
    feats.publish_current(entry, layout.features_current)
    return layout


def score_rows(model, spec, part: pd.DataFrame, batch_size: int, device: torch.device) -> dict:
    data = ImageRows(part.path.tolist(), part.label.tolist(), spec.prep(), Path("/"))
    logits, labels = predict_logits(model, data, batch_size, device)
    return scores(labels, softmax(logits), spec.num_classes)


def cross_validate_finetune(*, manifest: pd.DataFrame, fs: feats.FeatureSet, params: Params, images_root: Path, work_dir: Path, progress: bool = True) -> dict:
    """One fine-tuning per fold of `params.evaluate.cv_folds` with `params.finetune` (its method
    resolved: not auto); every fold's figures on its held-out rows and on target test, and their
    mean and std (eval.json's `cross_validation_finetune`)."""
    if params.finetune.method == "auto":
        raise ValueError("cross_validate_finetune takes a resolved recipe: resolve finetune.method auto first (finetune_job.resolve_method)")
    if fs.index.path.tolist() != manifest.path.tolist():
        raise ValueError("the cached features' rows are not the manifest's: rerun the features stage (dvc repro features)")
    k = params.evaluate.cv_folds
    folds = make_folds(fs, k, params.seed)
    device = select_device("auto")
    batch_size = params.finetune.batch_size * 2
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    per_fold = []
    for held_out in tqdm(range(k), desc="evaluate: fine-tuning cross-validation", unit="fold", disable=not progress):
        fold = fold_manifest(manifest, folds, held_out)
        with tempfile.TemporaryDirectory(prefix=f"fold{held_out}.", dir=work_dir) as tmp:
            layout = fold_project(Path(tmp), fold, fs, images_root)
            # Each fold its own training seed, as the head's folds have.
            result = run_finetune(layout, params.model_copy(update={"seed": params.seed + held_out}), progress=progress)
            absolute = pd.read_csv(layout.manifest, dtype={"path": str}, keep_default_na=False)
            held = absolute[absolute.split == HELD_OUT]
            per_fold.append(
                {
                    "fold": held_out,
                    "best_epoch": result.summary["best_epoch"],
                    "held_out": score_rows(result.model, result.spec, held, batch_size, device),
                    "target_test": score_rows(result.model, result.spec, rows(absolute, "target", "test"), batch_size, device),
                }
            )
    cfg = params.finetune
    return {
        "folds": k,
        "rows": int(folds.rows.size),
        "fold_sizes": np.bincount(folds.fold, minlength=k).tolist(),
        "recipe": {"strategy": cfg.strategy, "method": cfg.method, "selection": cfg.selection, "epochs": cfg.epochs},
        "held_out": {m: summary([f["held_out"] for f in per_fold], m) for m in CV_METRICS},
        "target_test": {m: summary([f["target_test"] for f in per_fold], m) for m in CV_METRICS},
        "per_fold": per_fold,
    }
