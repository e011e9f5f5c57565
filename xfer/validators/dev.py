"""Deep embedded validation (You et al., 2019): the source val loss, importance-weighted towards the target.

A domain classifier on the backbone features (logistic regression on their
leading principal components, source train vs unlabelled target) gives each source val row the density ratio
w = p(target | x) / p(source | x) * n_source / n_target. The weighted loss
w * loss estimates the target risk; the control variate eta * (w - 1) with
eta = -Cov(w * loss, w) / Var(w) cuts its variance. The score is minus that risk.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, per_candidate

WEIGHT_CLIP = 1e-3  # domain probabilities kept in [clip, 1 - clip], so a ratio never divides by 0


def density_ratio(e: Evidence) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    source = e.source_train_features if e.source_train_features is not None else e.source_val_features
    x = np.concatenate([e.projection(source), e.projection(e.target_features)])
    d = np.r_[np.zeros(len(source)), np.ones(len(e.target_features))]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=0.1, max_iter=1000, random_state=e.seed).fit(scaler.transform(x), d)
    p = np.clip(clf.predict_proba(scaler.transform(e.projection(e.source_val_features)))[:, 1], WEIGHT_CLIP, 1 - WEIGHT_CLIP)
    return p / (1 - p) * len(source) / len(e.target_features)


@per_candidate
def dev(c: Outputs, e: Evidence) -> float:
    """Minus the control-variate importance-weighted cross-entropy on source val."""
    w = e.importance_weights
    p = np.clip(np.asarray(c.source_val, dtype=np.float64)[np.arange(len(w)), e.source_val_labels], 1e-12, 1)
    weighted = w * -np.log(p)
    var = w.var()
    eta = -np.cov(weighted, w, bias=True)[0, 1] / var if var > 0 else 0.0
    return -float(weighted.mean() + eta * w.mean() - eta)
