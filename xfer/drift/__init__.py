"""Drift: do the images a served model receives still come from the target domain it was adapted to?

One file per test, one signature (`xfer.drift.base.DriftTest`): each compares a
reference window (the target images the model was trained for) with a window
of new images, seeded, and answers with a p-value.

    mmd                kernel MMD with a permutation null, on backbone features
    domain_classifier  held-out AUC of a reference-vs-new classifier on features (C2ST)
    class_ks           per-class KS tests on the predicted probabilities, Bonferroni-corrected

`xfer.drift.accuracy` estimates the model's accuracy on the new images without
their labels (ATC, calibrated on labelled target val).
"""

from __future__ import annotations

from xfer.drift.base import DriftError, DriftResult, DriftTest, Window
from xfer.drift.classifier import domain_classifier
from xfer.drift.ks import class_ks
from xfer.drift.mmd import mmd

DRIFT_TESTS: dict[str, DriftTest] = {"mmd": mmd, "domain_classifier": domain_classifier, "class_ks": class_ks}
DRIFT_TEST_NAMES = tuple(DRIFT_TESTS)


def run_tests(reference: Window, new: Window, *, alpha: float, seed: int, tests: tuple[str, ...] = DRIFT_TEST_NAMES) -> dict[str, DriftResult]:
    """Every named test on the two windows, each with its own seed derived from `seed`."""
    unknown = [t for t in tests if t not in DRIFT_TESTS]
    if unknown:
        raise DriftError(f"unknown drift tests {unknown}; valid: {', '.join(DRIFT_TEST_NAMES)}")
    if not 0.0 < alpha < 1.0:
        raise DriftError(f"alpha {alpha}: must be between 0 and 1")
    return {name: DRIFT_TESTS[name](reference, new, alpha=alpha, seed=seed + i) for i, name in enumerate(tests)}


__all__ = ["DRIFT_TESTS", "DRIFT_TEST_NAMES", "DriftError", "DriftResult", "DriftTest", "Window", "run_tests"]
