"""How far apart two domains are in a feature space: numbers and a picture's coordinates."""

from __future__ import annotations

import numpy as np


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def proxy_a_distance(source: np.ndarray, target: np.ndarray, seed: int = 0, max_per_domain: int = 2000) -> float:
    """2 (1 - 2 err) of a linear domain classifier on held-out rows (Ben-David et al.).

    0 means the domains cannot be told apart, 2 that they separate perfectly.
    Each domain is subsampled to the same size so a chance-level classifier
    scores err = 0.5 whatever the domain sizes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(source), len(target), max_per_domain)
    if n < 4:
        raise ValueError(f"proxy A-distance needs at least 4 rows per domain, got {len(source)} and {len(target)}")
    x = np.concatenate([_subsample(source, n, rng), _subsample(target, n, rng)]).astype(np.float64)
    d = np.r_[np.zeros(n), np.ones(n)]
    order = rng.permutation(len(x))
    half = len(x) // 2
    train, test = order[:half], order[half:]
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(x[train]), d[train])
    err = float((clf.predict(scaler.transform(x[test])) != d[test]).mean())
    return float(2.0 * (1.0 - 2.0 * min(err, 0.5)))


def tsne_coordinates(source: np.ndarray, target: np.ndarray, seed: int = 0, max_per_domain: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D t-SNE of both domains together: (coordinates, domain of each row (0 source, 1 target), chosen row indices)."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx_s = np.sort(rng.choice(len(source), min(len(source), max_per_domain), replace=False))
    idx_t = np.sort(rng.choice(len(target), min(len(target), max_per_domain), replace=False))
    x = np.concatenate([source[idx_s], target[idx_t]]).astype(np.float32)
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    domain = np.r_[np.zeros(len(idx_s), int), np.ones(len(idx_t), int)]
    return coords, domain, np.concatenate([idx_s, idx_t])
