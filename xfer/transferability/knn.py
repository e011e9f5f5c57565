"""Cross-validated k-NN accuracy on the source features: are same-class rows each other's neighbours?

A 5-nearest-neighbour vote has no parameters to fit, so its held-out
accuracy reads the geometry of the features themselves: high when each
class forms its own neighbourhood, chance (1 / C on balanced classes) when
the features ignore the label. The rows are L2-normalised first, so the
neighbours are by angle (cosine), as a linear or cosine head on frozen
features sees them: a row's norm, which varies with image contrast and
backbone, does not decide its neighbours.

Stratified 5-fold cross-validation, with fewer folds when the smallest
class has fewer than 5 rows (so that class still has a row in every
fold); shuffled by the seed. The score is the accuracy of the pooled
held-out predictions.
"""

from __future__ import annotations

import warnings

import numpy as np

from xfer.transferability.base import Features, capped

FOLDS = 5
NEIGHBOURS = 5


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Each row divided by its Euclidean norm (an all-zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fold_count(labels: np.ndarray) -> int:
    """FOLDS, or the smallest class's row count when that is smaller (never under 2)."""
    return max(2, min(FOLDS, int(np.unique(labels, return_counts=True)[1].min())))


def held_out_predictions(x: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Each row's k-NN prediction from a model that never saw it (stratified folds)."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    predicted = np.empty_like(labels)
    folds = StratifiedKFold(fold_count(labels), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A class with a single row cannot be in every fold: sklearn warns, and that row is simply
        # predicted from the other classes' rows.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(folds.split(x, labels))
    for train, held_out in splits:
        knn = KNeighborsClassifier(min(NEIGHBOURS, len(train))).fit(x[train], labels[train])
        predicted[held_out] = knn.predict(x[held_out])
    return predicted


def knn(features: Features, seed: int) -> float:
    """Held-out 5-NN accuracy of the L2-normalised source features (stratified k-fold, seeded)."""
    f = capped(features, seed)
    if len(f.source) < 2:
        raise ValueError(f"k-NN accuracy needs at least 2 labelled source rows; got {len(f.source)}")
    return float(np.mean(held_out_predictions(l2_normalised(f.source), f.source_labels, seed) == f.source_labels))
