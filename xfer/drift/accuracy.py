"""A label-free estimate of accuracy on new images: average thresholded confidence (ATC; Garg et al., ICLR 2022).

On target val, whose labels are known, choose the confidence threshold t at
which the share of images above t equals the accuracy there; on new images,
the estimate is the share above t. It reads target val labels once, to
calibrate: the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfer.drift.base import DriftError


@dataclass(frozen=True)
class ConfidenceThreshold:
    """t, and the target val accuracy it was calibrated to."""

    threshold: float
    calibration_accuracy: float
    calibration_rows: int

    def estimate(self, probabilities: np.ndarray) -> float:
        """The estimated accuracy of the model on images with these predicted probabilities."""
        return float((np.asarray(probabilities).max(1) > self.threshold).mean())


def calibrate(probabilities: np.ndarray, labels: np.ndarray) -> ConfidenceThreshold:
    """The ATC threshold from labelled rows (target val): the share of max-probabilities above it equals their accuracy."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise DriftError(f"calibration needs probabilities (n, C) and n labels, got {p.shape} and {y.shape}")
    confidence = np.sort(p.max(1))
    accuracy = float((p.argmax(1) == y).mean())
    # The share above confidence[k] is (n - k - 1)/n: pick k with that share closest to the accuracy.
    wrong = int(round((1.0 - accuracy) * len(confidence)))
    threshold = -np.inf if wrong == 0 else float(confidence[wrong - 1])
    return ConfidenceThreshold(threshold, accuracy, len(y))
