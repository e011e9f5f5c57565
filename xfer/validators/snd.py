"""Soft neighbourhood density (Saito et al., 2021): target rows whose predictions have many close neighbours.

Each target row's L2-normalised probability vector is compared with every
other row's; a softmax over those similarities (temperature 0.05, as in the
paper) is each row's soft neighbourhood, and its entropy is high when many
neighbours are close: a model that groups the target into dense clusters.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, entropy_rows, per_candidate

TEMPERATURE = 0.05
MAX_ROWS = 2000  # a seeded subsample above this: the similarity matrix is rows^2


@per_candidate
def snd(c: Outputs, e: Evidence) -> float:
    """Mean entropy of each target row's softmax over cosine similarities to the other rows."""
    p = np.asarray(c.target, dtype=np.float64)
    if len(p) > MAX_ROWS:
        p = p[np.random.default_rng(e.seed).choice(len(p), MAX_ROWS, replace=False)]
    z = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    sim = z @ z.T / TEMPERATURE
    np.fill_diagonal(sim, -np.inf)  # a row is not its own neighbour
    sim -= sim.max(1, keepdims=True)
    soft = np.exp(sim)
    soft /= soft.sum(1, keepdims=True)
    return float(entropy_rows(soft).mean())
