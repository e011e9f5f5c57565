"""Information maximisation: confident *and* diverse target predictions (Hu et al., 2017; SHOT).

Entropy alone rewards a model that puts every target row in one class with
certainty; the diversity term (entropy of the mean prediction) penalises that.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, entropy_rows, per_candidate


@per_candidate
def info_max(c: Outputs, e: Evidence) -> float:
    """Entropy of the mean target prediction minus the mean entropy of each."""
    diversity = float(entropy_rows(np.asarray(c.target, dtype=np.float64).mean(0, keepdims=True))[0])
    return diversity - float(entropy_rows(c.target).mean())
