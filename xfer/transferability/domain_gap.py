"""Domain gap: how easily a linear classifier tells the target's features from the source's.

The proxy A-distance (Ben-David et al., 2007; Ganin et al., 2016) trains a
domain classifier (source rows vs target rows) and reads its held-out error
err: PAD = 2 (1 - 2 err). Indistinguishable domains leave the classifier at
chance (err = 1/2, PAD = 0); disjoint ones let it be always right (err = 0,
PAD = 2). A head trained on the source transfers best through features in
which the target looks like the source, so a small gap is good.

The registry's `domain_gap` is therefore -PAD: higher = closer domains, like
every other score (`proxy_a_distance` gives PAD itself, `domain_auc` the
classifier's ROC AUC: 1/2 for indistinguishable domains, 1 for disjoint).

The classifier is a logistic regression on the standardised features, all
of them: a shift spread thinly over many dimensions is invisible in the
leading principal components when the class structure dominates those,
and the five fits on 8,000 rows of 2,048 features take seconds on one
thread. Its error is the balanced one (the mean of the two domains' error rates, classes weighted to
match), so 4,000 source rows against 400 target rows do not pass for a gap:
predicting "source" for everything has a balanced error of 1/2.
Cross-validated by stratified 5-fold, seeded.
"""

from __future__ import annotations

import numpy as np

from xfer.transferability.base import Features, capped

FOLDS = 5


def domain_rows(features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Source and target rows stacked, and which of them are target; ValueError if there is no target."""
    source, target = features.source, features.target
    if target.size == 0:
        raise ValueError("domain_gap needs target features: Features.target is empty (give the unlabelled target rows' features)")
    if target.ndim != 2 or target.shape[1] != source.shape[1]:
        raise ValueError(f"target features must be (n_t, {source.shape[1]}) like the source's; got {target.shape}")
    if min(len(source), len(target)) < 2:
        raise ValueError(f"domain_gap needs at least 2 rows in each domain; got {len(source)} source, {len(target)} target")
    return np.concatenate([source, target]), np.r_[np.zeros(len(source), bool), np.ones(len(target), bool)]


def held_out_domain_scores(features: Features, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's domain-classifier log-odds of being target, from folds that never saw it; and is-target."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    x, is_target = domain_rows(capped(features, seed))
    x = StandardScaler().fit_transform(x)  # without the domain labels, so fitting it on every row leaks nothing
    scores = np.empty(len(x))
    folds = StratifiedKFold(min(FOLDS, int(is_target.sum()), int((~is_target).sum())), shuffle=True, random_state=seed)
    for train, held_out in folds.split(x, is_target):
        clf = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed).fit(x[train], is_target[train])
        scores[held_out] = clf.decision_function(x[held_out])
    return scores, is_target


def balanced_error(scores: np.ndarray, is_target: np.ndarray) -> float:
    """Mean of the two domains' error rates when a positive log-odds means target."""
    says_target = scores > 0
    return float((np.mean(says_target[~is_target]) + np.mean(~says_target[is_target])) / 2)


def proxy_a_distance(features: Features, seed: int) -> float:
    """PAD = 2 (1 - 2 err) of the held-out domain classifier: 0 for indistinguishable domains, 2 for disjoint."""
    return 2 * (1 - 2 * balanced_error(*held_out_domain_scores(features, seed)))


def domain_auc(features: Features, seed: int) -> float:
    """ROC AUC of the held-out domain classifier: 1/2 for indistinguishable domains, 1 for disjoint."""
    from sklearn.metrics import roc_auc_score

    scores, is_target = held_out_domain_scores(features, seed)
    return float(roc_auc_score(is_target, scores))


def domain_gap(features: Features, seed: int) -> float:
    """Minus the proxy A-distance between source and target features: higher = closer domains."""
    return 0.0 - proxy_a_distance(features, seed)  # 0.0 - : indistinguishable domains read 0.0, not -0.0
