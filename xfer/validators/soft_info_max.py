"""Information maximisation read on softened target predictions (`info_max` at temperature 2).

A head trained by cross-entropy pushes most target rows far from the decision
boundary, where a row's entropy is all but zero whatever its margin (with 10
classes it is 7e-4 at a logit margin of 12, 4e-7 at 20). `info_max` then
judges a model by its few uncertain rows alone and cannot see how far the bulk
sits from the boundary. Softening each row, p -> p^(1/T) renormalised (the
softmax of log p / T), halves every margin at T = 2 and brings the bulk back
to where entropy still tells margins apart.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, per_candidate
from xfer.validators.info_max import information

# Chosen on the benchmark tasks' target test labels, never on the user's: on the
# selection benchmark's six shift tasks (five seeds), T = 2 scored best on the
# six together. One task held out at a time, the other five also chose 2 for
# five of the six; for the sixth (inverted intensities) they chose 3, which
# costs that task, so the held-out mean is below info_max's: T = 2 is the best
# single temperature found, not one shown to win on an unseen task
# (benchmarks/selection.py writes the table, built by benchmarks/soft_temperature.py;
# README "Model selection").
TEMPERATURE = 2.0


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Each row's softmax(log p / temperature): the same ranking of classes, margins divided by it."""
    # Clipped as entropy_rows clips: a probability that underflowed to 0 counts as 1e-12.
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


@per_candidate
def soft_info_max(c: Outputs, e: Evidence) -> float:
    """info_max on the target predictions softened to TEMPERATURE."""
    return information(soften(c.target, TEMPERATURE))
