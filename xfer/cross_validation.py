"""`evaluate.cv_folds: k`: stratified k-fold cross-validation of the head on cached features.

The labelled training rows (source train and val, and the labelled target budget)
are dealt into k folds, stratified by domain and class. Fold i is held out; the
head's recipe (the one the head stage kept, method and knob resolved) is trained
on the other folds but one: fold i + 1's source rows are its source val, where
its `head.selection` reads the epoch (a validator or source val accuracy), so no
held-out row takes part in training or in choosing. Every fold's head is then
scored on its held-out rows and on target test; the figures are reported as mean
and standard deviation over the folds.

Target test is never inside a fold: only the (role, split) pairs of
LABELLED_ROWS are. Unlabelled target rows take part in adaptation as in the head
stage; the held-out fold's labelled target rows do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from xfer import features as feats
from xfer.config import MIN_CV_FOLDS, HeadConfig
from xfer.heads import HeadData, predict_proba, train_head
from xfer.metrics import classification_metrics, expected_calibration_error, one_vs_rest_roc_auc

# The labelled rows a head may train on: what the folds are made of.
LABELLED_ROWS = (("source", "train"), ("source", "val"), ("target", "train"))
# Each fold's figures, reported as mean and std over the folds.
CV_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "roc_auc", "ece")


def check_folds(k: int, rows: int, source_rows: int) -> None:
    if k < MIN_CV_FOLDS:
        raise ValueError(f"evaluate.cv_folds is {k}: use 0 (off) or at least {MIN_CV_FOLDS} (a fold held out, one to choose the epoch on, the rest to train)")
    if k > rows:
        raise ValueError(f"evaluate.cv_folds is {k}, but there are only {rows} labelled training rows to deal into folds: use at most {rows}")
    # Every fold serves once as the next fold's source val: each needs a source row to choose the epoch on.
    if k > source_rows:
        raise ValueError(
            f"evaluate.cv_folds is {k}, but there are only {source_rows} labelled source rows: each fold needs one to serve as "
            f"source val, so use at most {source_rows}"
        )


def stratified_folds(strata: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Each row's fold (0..k-1): every stratum's rows shuffled (seeded) and dealt in turn, so each
    fold holds its share of every stratum, give or take one row, and the folds' sizes differ by
    at most one (each stratum starts dealing where the last one stopped)."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(strata), dtype=np.int64)
    dealt = 0
    for stratum in np.unique(strata):
        rows = np.flatnonzero(strata == stratum)
        rng.shuffle(rows)
        folds[rows] = (dealt + np.arange(rows.size)) % k
        dealt += rows.size
    return folds


@dataclass(frozen=True)
class Folds:
    rows: np.ndarray  # positions in the feature set's index (its manifest order) of the labelled rows
    fold: np.ndarray  # each of those rows' fold
    k: int


def make_folds(fs: feats.FeatureSet, k: int, seed: int) -> Folds:
    index = fs.index
    labelled = np.zeros(len(index), dtype=bool)
    for role, split in LABELLED_ROWS:
        labelled |= ((index.role == role) & (index.split == split)).to_numpy()
    rows = np.flatnonzero(labelled)
    check_folds(k, rows.size, int((index.role.to_numpy()[rows] == "source").sum()))
    strata = (index.role.to_numpy()[rows].astype(str) + "/" + index.label.to_numpy()[rows].astype(str)).astype(object)
    return Folds(rows, stratified_folds(strata, k, seed), k)


def fold_data(fs: feats.FeatureSet, folds: Folds, held_out: int) -> tuple[HeadData, np.ndarray]:
    """The head's data for fold `held_out`, and the positions of its held-out rows."""
    x = lambda pos: np.asarray(fs.features[pos], dtype=np.float32)  # noqa: E731
    y = fs.index.label.to_numpy()
    role = fs.index.role.to_numpy()
    validation = (held_out + 1) % folds.k
    train = folds.rows[(folds.fold != held_out) & (folds.fold != validation)]
    val = folds.rows[folds.fold == validation]
    source_train, source_val = train[role[train] == "source"], val[role[val] == "source"]
    target_labelled = train[role[train] == "target"]
    unlabelled, _ = fs.select("target", "unlabeled")
    target_train = np.concatenate([unlabelled, x(target_labelled)]) if target_labelled.size else unlabelled
    data = HeadData(
        (x(source_train), y[source_train]),
        (x(source_val), y[source_val]),
        target_train,
        fs.select("target", "val"),  # read only by the oracle rule `selection: target_val`, as in the head stage
        target_labeled=(x(target_labelled), y[target_labelled]) if target_labelled.size else None,
    )
    return data, folds.rows[folds.fold == held_out]


def scores(labels: np.ndarray, probabilities: np.ndarray, num_classes: int) -> dict[str, float | None]:
    figures = classification_metrics(labels, probabilities.argmax(1), num_classes)
    figures["roc_auc"] = one_vs_rest_roc_auc(labels, probabilities)[0]
    figures["ece"] = expected_calibration_error(probabilities, labels)
    return figures


def summary(per_fold: list[dict], metric: str) -> dict[str, float | None]:
    """Mean and standard deviation (ddof 1) of one figure over the folds that have it."""
    values = [f[metric] for f in per_fold if f[metric] is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def cross_validate_head(fs: feats.FeatureSet, recipe: HeadConfig, num_classes: int, k: int, seed: int, progress: bool = True) -> dict:
    """Train the recipe once per fold; every fold's figures on its held-out rows and on target test,
    and their mean and std (eval.json's `cross_validation`)."""
    folds = make_folds(fs, k, seed)
    x_test, y_test = fs.select("target", "test")
    role = fs.index.role.to_numpy()
    y = fs.index.label.to_numpy()
    per_fold = []
    for held_out in tqdm(range(k), desc="evaluate cross-validation", unit="fold", disable=not progress):
        data, rows = fold_data(fs, folds, held_out)
        head, history = train_head(recipe, data, num_classes, seed + held_out)
        held = np.asarray(fs.features[rows], dtype=np.float32)
        # Each held-out row through its own domain's branch (a head with domain_norm standardises per domain).
        probabilities = np.empty((rows.size, num_classes))
        for domain in ("source", "target"):
            mask = role[rows] == domain
            if mask.any():
                probabilities[mask] = predict_proba(head, held[mask], domain)
        per_fold.append(
            {
                "fold": held_out,
                "held_out": scores(y[rows], probabilities, num_classes),
                "target_test": scores(y_test, predict_proba(head, x_test, "target"), num_classes),
            }
        )
    return {
        "folds": k,
        "rows": int(folds.rows.size),
        "fold_sizes": np.bincount(folds.fold, minlength=k).tolist(),
        "recipe": {"method": recipe.method, "selection": recipe.selection},
        "held_out": {m: summary([f["held_out"] for f in per_fold], m) for m in CV_METRICS},
        "target_test": {m: summary([f["target_test"] for f in per_fold], m) for m in CV_METRICS},
        "per_fold": per_fold,
    }
