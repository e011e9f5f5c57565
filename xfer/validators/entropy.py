"""Target entropy: confident predictions on the target score higher (Morerio et al., 2018)."""

from __future__ import annotations

from xfer.validators.base import Evidence, Outputs, entropy_rows, per_candidate


@per_candidate
def entropy(c: Outputs, e: Evidence) -> float:
    """Minus the mean entropy of the target predictions."""
    return -float(entropy_rows(c.target).mean())
