"""Importance weighting: source rows weighted by how target-like they are (`importance_weighting: true`).

Under covariate shift (the target draws x from p_t, the source from p_s, the
labels follow the same p(y | x)), a loss over source rows weighted by the
density ratio w(x) = p_t(x) / p_s(x) has the target's expected loss as its
expectation (Shimodaira, 2000). The ratio is read off a domain classifier on
the cached features: with the two domains weighted equally, its log-odds of
"target" estimate log p_t(x) / p_s(x) (Bickel et al., 2007).

The classifier is a logistic regression on the standardised features. Each
source row's log-odds comes from the folds that did not train on it
(cross-fitting: a classifier scoring its own training rows is overconfident and
gives extreme weights), and the L2 strength is the one whose held-out domain
log-loss is lowest, so the choice needs domain labels only, never class
labels. The ratios are then clipped at `max_weight` and normalised to mean 1
(one scale c with mean(min(c r, max_weight)) = 1): a few rows that look very
target-like cannot take over the loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

FOLDS = 5
# L2 strengths tried (scikit-learn's C, inverse): from nearly constant weights to a sharp classifier.
C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
# Domain rows the classifier reads at most, each domain subsampled (seeded) to this many beyond it;
# every source row still gets a weight (rows outside the sample are scored by every fold's mean).
MAX_ROWS_PER_DOMAIN = 4000


@dataclass(frozen=True)
class ImportanceWeights:
    weights: np.ndarray  # one per source row, mean 1, at most max_weight
    effective_sample_size: float  # (sum w)^2 / sum w^2: how many equally weighted rows they are worth
    domain_auc: float  # the held-out domain classifier's ROC AUC: 1/2 = domains indistinguishable
    c: float  # the L2 strength kept (scikit-learn's C)
    clipped: int  # source rows at max_weight

    def summary(self) -> dict[str, float | int]:
        return {
            "effective_sample_size": round(self.effective_sample_size, 1),
            "rows": int(self.weights.size),
            "max_weight": float(self.weights.max()),
            "clipped": self.clipped,
            "domain_auc": round(self.domain_auc, 4),
            "c": self.c,
        }


def clip_and_normalise(ratios: np.ndarray, max_weight: float) -> np.ndarray:
    """min(c r, max_weight) with c chosen so that the mean is 1 (ratios > 0, max_weight >= 1)."""
    if max_weight < 1:
        raise ValueError(f"max_weight is {max_weight}: weights of mean 1 need a cap of at least 1")
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0 or not np.isfinite(r).all() or (r <= 0).any():
        raise ValueError("density ratios must be finite and positive")
    # mean(min(c r, M)) grows with c from 0 to M: bisect on log c between a c that leaves every
    # row below 1 (mean < 1) and one that puts every row at the cap (mean = M >= 1).
    lo, hi = np.log(1.0 / r.max()) - 1.0, np.log(max_weight / r.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.minimum(np.exp(mid) * r, max_weight).mean() < 1.0:
            lo = mid
        else:
            hi = mid
    w = np.minimum(np.exp(hi) * r, max_weight)
    return w / w.mean() if max_weight > 1 else np.ones_like(w)


def effective_sample_size(weights: np.ndarray) -> float:
    return float(weights.sum() ** 2 / np.square(weights).sum())


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def _balanced_log_loss(log_odds: np.ndarray, is_target: np.ndarray) -> float:
    """Mean over the two domains of each domain's mean log-loss (the domains weighted equally)."""
    loss = np.logaddexp(0.0, np.where(is_target, -log_odds, log_odds))
    return float((loss[is_target].mean() + loss[~is_target].mean()) / 2)


def domain_log_odds(source: np.ndarray, target: np.ndarray, seed: int) -> tuple[np.ndarray, float, float]:
    """Every source row's held-out log-odds of being target, the C kept, and the held-out domain AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from xfer.metrics import binary_roc_auc

    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target features must be (rows, dim) of one dim; got {source.shape} and {target.shape}")
    if min(len(source), len(target)) < FOLDS:
        raise ValueError(f"importance weighting needs at least {FOLDS} rows in each domain; got {len(source)} source, {len(target)} target")
    rng = np.random.default_rng(seed)
    s_rows, t_rows = _subsample(len(source), MAX_ROWS_PER_DOMAIN, rng), _subsample(len(target), MAX_ROWS_PER_DOMAIN, rng)
    x = np.concatenate([source[s_rows], target[t_rows]]).astype(np.float64)
    is_target = np.r_[np.zeros(s_rows.size, bool), np.ones(t_rows.size, bool)]
    scaler = StandardScaler().fit(x)  # without the domain labels: fitting it on every row leaks nothing
    x = scaler.transform(x)
    held_out = np.empty((len(C_GRID), len(x)))
    fold_models = {c: [] for c in C_GRID}
    for train, test in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(x, is_target):
        for i, c in enumerate(C_GRID):
            clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed).fit(x[train], is_target[train])
            held_out[i, test] = clf.decision_function(x[test])
            fold_models[c].append(clf)
    best = int(np.argmin([_balanced_log_loss(h, is_target) for h in held_out]))
    c = C_GRID[best]
    log_odds = np.empty(len(source))
    log_odds[s_rows] = held_out[best, : s_rows.size]
    rest = np.setdiff1d(np.arange(len(source)), s_rows)
    if rest.size:  # rows no fold trained on: the folds' mean log-odds
        x_rest = scaler.transform(source[rest].astype(np.float64))
        log_odds[rest] = np.mean([m.decision_function(x_rest) for m in fold_models[c]], axis=0)
    auc = binary_roc_auc(held_out[best], is_target)
    return log_odds, float(c), float(auc)


_CACHE: dict[str, ImportanceWeights] = {}


def importance_weights(source: np.ndarray, target: np.ndarray, max_weight: float, seed: int) -> ImportanceWeights:
    """Clipped, normalised density-ratio weights of the source rows against the (unlabelled) target rows.

    Computed once per (features, max_weight, seed) in a process: a head search trains many
    candidates on the same rows.
    """
    source, target = np.ascontiguousarray(source, dtype=np.float32), np.ascontiguousarray(target, dtype=np.float32)
    digest = hashlib.sha256()
    for part in (source, target):
        digest.update(str(part.shape).encode())
        digest.update(part.tobytes())
    key = f"{digest.hexdigest()}:{max_weight}:{seed}"
    if key not in _CACHE:
        log_odds, c, auc = domain_log_odds(source, target, seed)
        # Floored so that no ratio underflows to 0 (every source row keeps a positive weight).
        weights = clip_and_normalise(np.exp(np.maximum(log_odds - log_odds.max(), -700.0)), max_weight)
        clipped = int(np.isclose(weights, max_weight).sum()) if max_weight > 1 else 0
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = ImportanceWeights(weights, effective_sample_size(weights), auc, c, clipped)
    return _CACHE[key]
