"""Kernel MMD two-sample test on features, with a permutation null (Gretton et al., JMLR 2012)."""

from __future__ import annotations

import numpy as np

from xfer.drift.base import DriftResult, Window, check_same_space, permutation_p_value

PERMUTATIONS = 500


def squared_distances(x: np.ndarray) -> np.ndarray:
    norms = (x * x).sum(1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * x @ x.T, 0.0)


def mmd2(kernel: np.ndarray, is_new: np.ndarray) -> np.ndarray:
    """Biased squared MMD between the rows flagged new and the others, for each column of `is_new`
    (n,) or (n, P): block sums of the pooled kernel matrix as quadratic forms, one matrix product for all P."""
    b = np.asarray(is_new, dtype=np.float64).reshape(len(kernel), -1)
    a = 1.0 - b
    kb = kernel @ b
    ka = kernel.sum(1, keepdims=True) - kb
    na, nb = a.sum(0), b.sum(0)
    return (a * ka).sum(0) / na**2 + (b * kb).sum(0) / nb**2 - 2 * (a * kb).sum(0) / (na * nb)


def mmd(reference: Window, new: Window, *, alpha: float, seed: int, permutations: int = PERMUTATIONS) -> DriftResult:
    """Squared MMD with a Gaussian kernel whose bandwidth is the median pairwise distance of the pooled
    windows (no knob to tune); the p-value is the share of `permutations` random relabellings of the
    pooled rows whose MMD reaches the observed one."""
    check_same_space(reference, new)
    x = np.concatenate([reference.features, new.features])
    sq = squared_distances(x)
    off_diagonal = sq[~np.eye(len(x), dtype=bool)]
    bandwidth = float(np.median(off_diagonal)) or 1.0
    kernel = np.exp(-sq / bandwidth)
    is_new = np.arange(len(x)) >= len(reference)
    observed = float(mmd2(kernel, is_new)[0])
    rng = np.random.default_rng(seed)
    null = mmd2(kernel, np.stack([rng.permutation(is_new) for _ in range(permutations)], axis=1))
    return DriftResult("mmd", observed, permutation_p_value(observed, null), alpha, {"bandwidth": bandwidth, "permutations": permutations})
