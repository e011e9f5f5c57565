"""H-score (Bao et al., ICIP 2019): how much of the features' spread separates the classes.

H(f) = tr(cov(f)^-1 cov(E[f | y])): the between-class covariance (each row
replaced by its class's mean feature) measured in units of the total
covariance. It is the optimal objective of a linear head's
maximal-correlation (HGR) problem: each of its at most C - 1 nonzero
eigenvalues is the share of one direction's variance explained by the class,
so H lies in [0, C - 1], and features whose class means sit far apart
relative to their spread score near C - 1.

The ridge. With fewer rows than dimensions (n < d), cov(f) is singular, and
with a vanishing ridge any features at all (pure noise too) separate n rows
perfectly and score C - 1. So cov(f) is shrunk towards (tr cov(f) / d) I
with Ledoit and Wolf's estimate w of the best weight: small when rows are
plentiful, near 1 when they are not. The between-class covariance is shrunk
by the same factor 1 - w (the regularised H-score of Ibrahim et al., "Newer
is not always better"), so H stays in [0, C - 1]: shrinking only the
denominator would shrink its large directions too and let H pass C - 1.
The weight is at least RIDGE_FLOOR, which keeps the solve stable even when
the estimate is 0 and the features have dead (constant) columns. In one
dimension the shrinkage target is the variance itself and the estimate is 0,
so there H is the between-class variance over the total (to RIDGE_FLOOR).
"""

from __future__ import annotations

import numpy as np

from xfer.transferability.base import Features, capped

RIDGE_FLOOR = 1e-6  # the least shrinkage weight towards the scaled identity


def shrinkage_weight(x: np.ndarray) -> float:
    """Ledoit and Wolf's weight on the scaled identity for cov(x), at least RIDGE_FLOOR."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    return max(float(ledoit_wolf_shrinkage(x)), RIDGE_FLOOR)


def shrunk(cov: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) cov + weight (tr cov / d) I."""
    scale = np.trace(cov) / len(cov)
    return (1 - weight) * cov + weight * scale * np.eye(len(cov))


def h_score(x: np.ndarray, labels: np.ndarray, weight: float) -> float:
    """tr(shrunk cov(x)^-1 (1 - weight) cov(E[x | y])), as the sum over classes c of
    p_c (1 - weight) mu_c^T shrunk cov(x)^-1 mu_c, mu_c the class's mean minus the overall mean."""
    from scipy.linalg import solve
    from sklearn.covariance import empirical_covariance

    classes, counts = np.unique(labels, return_counts=True)
    centred_means = np.stack([x[labels == c].mean(0) for c in classes]) - x.mean(0)  # (C, d)
    solved = solve(shrunk(empirical_covariance(x), weight), centred_means.T, assume_a="pos")  # (d, C): C solves, no inverse
    return float((1 - weight) * np.sum(counts / len(x) * np.einsum("cd,dc->c", centred_means, solved)))


def hscore(features: Features, seed: int) -> float:
    """Between-class covariance of the source features in units of their total covariance, both shrunk."""
    f = capped(features, seed)
    return h_score(f.source, f.source_labels, shrinkage_weight(f.source))
