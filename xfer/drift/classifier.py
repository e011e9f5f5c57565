"""Domain-classifier two-sample test (C2ST; Lopez-Paz and Oquab, ICLR 2017) on features.

A logistic regression learns to tell new rows from reference rows on one half
of each window and scores the other half. If the windows come from one
distribution its held-out AUC is 0.5 up to chance; the p-value is the
Mann-Whitney U test's on those held-out scores (AUC = U / (n_new n_ref)).
"""

from __future__ import annotations

import numpy as np

from xfer.drift.base import DriftResult, Window, check_same_space

# The features are projected to at most this many principal components (fitted on the training half):
# a classifier on 1,280 raw dims of a few hundred rows fits noise.
PCA_DIMS = 32


def split_halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    return order[: n // 2], order[n // 2 :]


def domain_classifier(reference: Window, new: Window, *, alpha: float, seed: int) -> DriftResult:
    """Held-out AUC of reference-vs-new logistic regression, and its one-sided Mann-Whitney p-value."""
    from scipy.stats import mannwhitneyu
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_same_space(reference, new)
    rng = np.random.default_rng(seed)
    ref_fit, ref_held = split_halves(len(reference), rng)
    new_fit, new_held = split_halves(len(new), rng)
    x_fit = np.concatenate([reference.features[ref_fit], new.features[new_fit]])
    y_fit = np.r_[np.zeros(len(ref_fit)), np.ones(len(new_fit))]
    dims = min(PCA_DIMS, len(x_fit) - 1, x_fit.shape[1])
    model = make_pipeline(StandardScaler(), PCA(dims, random_state=seed), LogisticRegression(C=1.0, max_iter=1000))
    model.fit(x_fit, y_fit)
    score_new = model.decision_function(new.features[new_held])
    score_ref = model.decision_function(reference.features[ref_held])
    u, p_value = mannwhitneyu(score_new, score_ref, alternative="greater")
    auc = float(u / (len(score_new) * len(score_ref)))
    return DriftResult("domain_classifier", auc, float(p_value), alpha, {"auc": auc, "held_out": [len(ref_held), len(new_held)]})
