"""Per image, not per window: is this one image unlike the target domain the model was adapted to?

The score is the distance, in L2-normalised backbone features, from the image
to its k-th nearest row of the reference window (deep nearest neighbours, Sun
et al. 2022). The threshold is calibrated on the window itself, target val
images the model never trained on, without reading a label: each reference
row's distance to its k-th nearest *other* row, and the `quantile` of those.
So about 1 - quantile of new in-domain images are flagged, and an image far
from every reference image is flagged whatever the model predicts for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xfer.drift.base import DriftError

METHOD = "distance to the k-th nearest reference row, L2-normalised backbone features"


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _kth_distance(queries: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Each query row's distance to its k-th nearest reference row (itself left out when both are one array)."""
    # |a - b|^2 = 2 - 2 a.b for unit vectors; one product, in chunks to bound memory.
    out = np.empty(len(queries))
    for start in range(0, len(queries), 1024):
        sq = np.clip(2.0 - 2.0 * queries[start : start + 1024] @ reference.T, 0.0, None)
        if exclude_self:
            rows = np.arange(start, min(start + 1024, len(queries)))
            sq[rows - start, rows] = np.inf
        out[start : start + 1024] = np.sqrt(np.partition(sq, k - 1, axis=1)[:, k - 1])
    return out


@dataclass(frozen=True)
class NearestNeighbourOOD:
    reference: np.ndarray  # (rows, dim), L2-normalised
    k: int
    quantile: float
    threshold: float

    @classmethod
    def calibrate(cls, reference_features: np.ndarray, k: int = 5, quantile: float = 0.95) -> "NearestNeighbourOOD":
        if not 0.5 <= quantile < 1.0:
            raise DriftError(f"OOD quantile {quantile}: must be at least 0.5 and below 1")
        reference = _normalised(reference_features)
        if len(reference) <= k:
            raise DriftError(f"OOD calibration needs more than k={k} reference rows; the window has {len(reference)}")
        own = _kth_distance(reference, reference, k, exclude_self=True)
        return cls(reference, k, quantile, float(np.quantile(own, quantile)))

    @classmethod
    def from_meta(cls, reference_features: np.ndarray, meta: dict) -> "NearestNeighbourOOD":
        """The scorer a reference window's meta.json describes (its threshold as calibrated then)."""
        return cls(_normalised(reference_features), int(meta["k"]), float(meta["quantile"]), float(meta["threshold"]))

    def scores(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.reference.shape[1]:
            raise DriftError(f"features of shape {features.shape}: the reference window has {self.reference.shape[1]} dims")
        return _kth_distance(_normalised(features), self.reference, self.k)

    def flags(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(score, flag) per row: flagged when the score is above the calibrated threshold."""
        scores = self.scores(features)
        return scores, scores > self.threshold

    def as_meta(self) -> dict:
        return {
            "method": METHOD,
            "k": self.k,
            "quantile": self.quantile,
            "threshold": self.threshold,
            "calibrated_on": "the reference window (target val), each row against the others; reads no label",
        }
