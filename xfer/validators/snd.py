"""Soft neighbourhood density (Saito et al., 2021): target rows whose predictions have many close neighbours.

Each target row's L2-normalised probability vector is compared with every
other row's; a softmax over those similarities (temperature 0.05, as in the
paper) is each row's soft neighbourhood, and its entropy is high when many
neighbours are close: a model that groups the target into dense clusters.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, per_candidate

TEMPERATURE = 0.05
MAX_ROWS = 2000  # a seeded subsample above this: the similarity matrix is rows^2


@per_candidate
def snd(c: Outputs, e: Evidence) -> float:
    """Mean entropy of each target row's softmax over cosine similarities to the other rows."""
    p = np.asarray(c.target, dtype=np.float32)  # float32: the rows^2 softmax is the cost
    if len(p) > MAX_ROWS:
        p = p[np.random.default_rng(e.seed).choice(len(p), MAX_ROWS, replace=False)]
    z = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    sim = z @ z.T / TEMPERATURE
    np.fill_diagonal(sim, -1e4)  # a row is not its own neighbour (finite, so 0 * it stays 0 below)
    sim -= sim.max(1, keepdims=True)
    weights = np.exp(sim)
    total = weights.sum(1)
    # Entropy of softmax(sim) per row, without a second rows^2 log: log Z - E[sim].
    return float(np.mean(np.log(total) - (weights * sim).sum(1) / total))
