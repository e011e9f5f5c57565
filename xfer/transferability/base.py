"""What every transferability score sees: one frozen backbone's cached features, and a seed.

A score is computed before any head is trained: from the features the
backbone gives labelled source rows (and, for the domain gap, unlabelled
target rows). Higher is better for every score, so candidates rank the same
way whichever score reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

MAX_ROWS = 4000  # rows kept per domain: a seeded subsample above this keeps every score to seconds


@dataclass(frozen=True)
class Features:
    """One candidate backbone's features: labelled source rows, unlabelled target rows."""

    source: np.ndarray  # (n_s, d) float, a frozen backbone's features of labelled source rows
    source_labels: np.ndarray  # (n_s,) int class indices 0..C-1
    target: np.ndarray  # (n_t, d) float, features of unlabelled target rows (may be empty for scores that ignore it)


#: score(features, seed) -> one number; higher = the backbone is expected to transfer better.
Score = Callable[[Features, int], float]


def kept_rows(n: int, rng: np.random.Generator, limit: int = MAX_ROWS) -> np.ndarray:
    """Indices of the rows a score reads: all of them, or `limit` drawn without replacement (in order)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, limit, replace=False))


def capped(features: Features, seed: int, limit: int = MAX_ROWS) -> Features:
    """The features as float64, each domain subsampled (seeded, so reruns agree) to at most `limit` rows."""
    rng = np.random.default_rng(seed)
    source = np.asarray(features.source, dtype=np.float64)
    labels = np.asarray(features.source_labels).astype(np.int64)
    if source.ndim != 2 or labels.shape != (len(source),):
        raise ValueError(f"source features must be (n, d) with one label per row; got {source.shape} and {labels.shape}")
    keep_source = kept_rows(len(source), rng, limit)
    target = np.asarray(features.target, dtype=np.float64)
    if target.size:
        target = target[kept_rows(len(target), rng, limit)]
    return Features(source=source[keep_source], source_labels=labels[keep_source], target=target)
