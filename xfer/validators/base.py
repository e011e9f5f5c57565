"""What every validator sees: candidates' predictions, and the evidence they are judged against.

A candidate is one trained model (an epoch of one run, or one method of a
search). A validator scores a list of candidates from their class
probabilities on the unlabelled target rows and on the labelled source val
rows; higher is better. No validator sees a target label.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

PCA_DIMS = 64


def pca_for(x: np.ndarray, seed: int, dims: int = PCA_DIMS):
    """An unfitted PCA keeping the first `dims` components of rows `x` (as many as there are rows,
    less one, on a small set), or None when that would keep every column anyway."""
    dims = min(dims, len(x) - 1)
    if x.shape[1] <= dims or dims < 1:
        return None
    from sklearn.decomposition import PCA

    return PCA(dims, svd_solver="randomized", random_state=seed)


@dataclass(frozen=True)
class Outputs:
    """One candidate's class probabilities on the unlabelled target rows and on source val."""

    target: np.ndarray  # (n_target, C)
    source_val: np.ndarray  # (n_source_val, C)


@dataclass(frozen=True)
class Projection:
    """Features -> their leading principal components (the identity without a fitted PCA).

    An object, not a closure: evidence travels to the worker processes of a search.
    """

    pca: object | None

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        return x if self.pca is None else self.pca.transform(x)


@dataclass
class Evidence:
    """Shared by every candidate, so their scores compare.

    The features are the frozen backbone's (the same for every candidate):
    DEV's importance weights and ClassAMI's clusters are computed once from
    them. `source_train_features` (optional) trains DEV's domain classifier,
    so the weights are not fitted on the rows they weight.
    """

    source_val_labels: np.ndarray
    source_val_features: np.ndarray
    target_features: np.ndarray
    source_train_features: np.ndarray | None = None
    num_classes: int | None = None
    seed: int = 0

    @property
    def classes(self) -> int:
        return int(self.num_classes or self.source_val_labels.max() + 1)

    @cached_property
    def projection(self):
        """x -> its first PCA_DIMS principal components over source and target rows.

        The domain classifier and k-means run there: seconds instead of tens on
        1,000+-wide backbone features, and the leading components carry the
        domain and class structure both look for.
        """
        rows = [self.source_val_features if self.source_train_features is None else self.source_train_features, self.target_features]
        x = np.concatenate(rows).astype(np.float64)
        pca = pca_for(x, self.seed)
        return Projection(None if pca is None else pca.fit(x))

    @cached_property
    def importance_weights(self) -> np.ndarray:
        """p(target | x) / p(source | x) on the source val rows, from a domain classifier (DEV)."""
        from xfer.validators.dev import density_ratio

        return density_ratio(self)

    @cached_property
    def target_clusters(self) -> np.ndarray:
        """k-means (k = classes) cluster of each target row's features (ClassAMI)."""
        from xfer.validators.class_ami import cluster_target

        return cluster_target(self)


#: score(candidates, evidence) -> one score per candidate, higher is better.
Validator = Callable[[Sequence[Outputs], Evidence], np.ndarray]


def entropy_rows(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each probability row."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(1)


def per_candidate(fn: Callable[[Outputs, Evidence], float]) -> Validator:
    """A validator that scores each candidate on its own."""

    def score(candidates: Sequence[Outputs], evidence: Evidence) -> np.ndarray:
        return np.array([fn(c, evidence) for c in candidates], dtype=np.float64)

    score.__doc__ = fn.__doc__
    score.__name__ = fn.__name__
    score.needs_all = False
    return score
