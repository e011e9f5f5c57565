"""Small generated domain shifts whose right answer is known."""

from __future__ import annotations

import numpy as np


def rotated_clusters(n_per_class: int, seed: int, angle_deg: float = 0.0, classes: int = 4, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """One Gaussian cluster per class on a circle, rotated by `angle_deg` in the target, lifted to `dim` dims.

    The target keeps the class clusters, only turned: a source boundary cuts
    through their edges, and a method that trusts cluster structure
    (MCC, self-training) can move it back into the gaps.
    """
    rng = np.random.default_rng(seed)
    lift = np.random.default_rng(123).normal(size=(2, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    angle = 2 * np.pi * y / classes + np.deg2rad(angle_deg)
    plane = 3 * np.stack([np.cos(angle), np.sin(angle)], 1) + rng.normal(scale=0.8, size=(len(y), 2))
    x = plane @ lift + 0.1 * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def spurious_offset(n_per_class: int, seed: int, target: bool, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two kinds of feature: a true class signal (2 dims, noisy) and a nuisance block (one-hot, clean).

    In the source the nuisance block names the class, so a source model leans
    on it; in the target it names a random class and is offset. The true
    signal has the same distribution in both domains. Aligning the domains
    means dropping the nuisance block, which is the right answer.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    angle = 2 * np.pi * y / classes
    signal = 3 * np.stack([np.cos(angle), np.sin(angle)], 1) + rng.normal(scale=0.6, size=(len(y), 2))
    nuisance_class = rng.integers(0, classes, len(y)) if target else y
    nuisance = 3.0 * np.eye(classes)[nuisance_class] + rng.normal(scale=0.3, size=(len(y), classes)) + (2.0 if target else 0.0)
    return np.concatenate([signal, nuisance], 1).astype(np.float32), y
