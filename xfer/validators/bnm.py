"""Batch nuclear norm (Cui et al., 2020): the nuclear norm of the target prediction matrix.

Large when predictions are both confident (rows near one-hot) and diverse
(many classes used): the rank of the matrix counts the classes predicted.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, per_candidate


@per_candidate
def bnm(c: Outputs, e: Evidence) -> float:
    """||P||_* / n over the target rows' probabilities P (n x C)."""
    p = np.asarray(c.target, dtype=np.float64)
    return float(np.linalg.svd(p, compute_uv=False).sum() / len(p))
