"""Source val accuracy: the classic rule. Cheap and label-free for the target, but blind to the shift."""

from __future__ import annotations

from xfer.validators.base import Evidence, Outputs, per_candidate


@per_candidate
def source_val(c: Outputs, e: Evidence) -> float:
    """Accuracy on labelled source val rows."""
    return float((c.source_val.argmax(1) == e.source_val_labels).mean())
