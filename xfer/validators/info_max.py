"""Information maximisation: confident *and* diverse target predictions (Hu et al., 2017; SHOT).

Entropy alone rewards a model that puts every target row in one class with
certainty; the diversity term (entropy of the mean prediction) penalises that.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, entropy_rows, per_candidate


def information(probs: np.ndarray) -> float:
    """Entropy of the mean prediction minus the mean entropy of each row."""
    p = np.asarray(probs, dtype=np.float64)
    return float(entropy_rows(p.mean(0, keepdims=True))[0]) - float(entropy_rows(p).mean())


@per_candidate
def info_max(c: Outputs, e: Evidence) -> float:
    """Entropy of the mean target prediction minus the mean entropy of each."""
    return information(c.target)
