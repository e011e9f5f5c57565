"""Label suggestion: one row per cluster of the target pool, the most uncertain of each, most uncertain first."""

import numpy as np
import pytest

from xfer.suggest import suggest_labels
from xfer.validators.base import entropy_rows

CLASSES = 4


def blobs(centres: int = 3, per: int = 30, dim: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`centres` tight, far-apart groups in `dim` dimensions (wider than the PCA projection): rows, cluster of each."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 50, (centres, dim))
    cluster = np.repeat(np.arange(centres), per)
    return means[cluster] + rng.normal(0, 1, (len(cluster), dim)), cluster


def confident(rows: int, p: float = 0.97) -> np.ndarray:
    probs = np.full((rows, CLASSES), (1 - p) / (CLASSES - 1))
    probs[:, 0] = p
    return probs


def test_one_row_per_cluster_the_most_uncertain_of_each_most_uncertain_first():
    x, cluster = blobs()
    probs = confident(len(x))
    # In each cluster one row is less sure than the rest, by a different amount per cluster.
    unsure = {0: 5, 1: 40, 2: 77}  # cluster -> row
    for p, row in zip((0.6, 0.3, 0.45), (unsure[0], unsure[1], unsure[2])):
        probs[row] = [p, *[(1 - p) / (CLASSES - 1)] * (CLASSES - 1)]
    picks = suggest_labels(x, probs, 3, seed=0)
    assert sorted(cluster[picks]) == [0, 1, 2]
    # Most uncertain first: p=0.3 (cluster 1), then 0.45 (cluster 2), then 0.6 (cluster 0).
    assert picks.tolist() == [40, 77, 5]
    assert np.all(np.diff(entropy_rows(probs[picks])) <= 0)


def test_an_uncertain_row_beats_the_confident_row_nearest_the_centre():
    x, cluster = blobs(centres=1, per=40)
    centre_row = int(np.argmin(np.linalg.norm(x - x.mean(0), axis=1)))
    far_row = int(np.argmax(np.linalg.norm(x - x.mean(0), axis=1)))
    probs = confident(len(x))
    probs[far_row] = np.full(CLASSES, 1 / CLASSES)
    assert suggest_labels(x, probs, 1).tolist() == [far_row]
    # The typical row instead, when asked.
    assert suggest_labels(x, probs, 1, within="centre").tolist() == [centre_row]
    # With every row equally sure, the tie goes to the row nearest the centre.
    assert suggest_labels(x, confident(len(x)), 1).tolist() == [centre_row]


def test_same_seed_same_picks_and_every_pick_distinct():
    x, _ = blobs(centres=5, per=20, seed=1)
    probs = np.random.default_rng(2).dirichlet(np.ones(CLASSES), len(x))
    a, b = suggest_labels(x, probs, 12, seed=3), suggest_labels(x, probs, 12, seed=3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 12
    assert np.all(np.diff(entropy_rows(probs[a])) <= 0), "most uncertain first"
    # Every row asked for: all of them, most uncertain first.
    every = suggest_labels(x, probs, len(x))
    assert sorted(every.tolist()) == list(range(len(x))) and np.all(np.diff(entropy_rows(probs[every])) <= 0)


def test_duplicate_rows_fill_empty_clusters_with_the_most_uncertain_left():
    x = np.repeat(np.eye(3) * 10, 4, axis=0)  # 12 rows, only 3 distinct
    probs = confident(12)
    probs[7] = np.full(CLASSES, 1 / CLASSES)
    picks = suggest_labels(x, probs, 5)
    assert len(set(picks.tolist())) == 5 and picks[0] == 7


@pytest.mark.parametrize("n", [0, -1, 91, 2.0, True])
def test_n_outside_one_to_the_pool_is_refused(n):
    x, _ = blobs()
    with pytest.raises(ValueError, match="n must be an integer from 1 to the 90 unlabelled target rows"):
        suggest_labels(x, confident(len(x)), n)


def test_features_and_probabilities_must_have_the_same_rows():
    x, _ = blobs()
    with pytest.raises(ValueError, match="one row each"):
        suggest_labels(x, confident(len(x) - 1), 2)
