"""Ensemble validation (EnsV, Hu et al., 2023): agreement with the mean of every candidate.

The average of the candidates' target probabilities is a better classifier
than a typical candidate; each candidate scores its accuracy against that
ensemble's argmax. It needs the whole candidate set, so it is scored after
all candidates are trained.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from xfer.validators.base import Evidence, Outputs


def ensv(candidates: Sequence[Outputs], e: Evidence) -> np.ndarray:
    """Per candidate: the fraction of target rows where its argmax is the ensemble's."""
    consensus = np.mean([np.asarray(c.target, dtype=np.float64) for c in candidates], axis=0).argmax(1)
    return np.array([float((c.target.argmax(1) == consensus).mean()) for c in candidates])


ensv.needs_all = True
