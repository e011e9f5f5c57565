"""Black-box shift detection (Lipton et al. 2018; Rabanser et al., NeurIPS 2019): the model's outputs as the test.

One Kolmogorov-Smirnov test per class on the predicted probability of that
class, reference window against new; the C p-values are combined with the
Bonferroni correction (the smallest times C, at most 1), so the test as a
whole keeps its level alpha.
"""

from __future__ import annotations

import numpy as np

from xfer.drift.base import DriftResult, Window, check_same_space


def class_ks(reference: Window, new: Window, *, alpha: float, seed: int) -> DriftResult:
    """Bonferroni-corrected minimum of the per-class two-sample KS p-values; `seed` is unused (the test is exact)."""
    from scipy.stats import ks_2samp

    check_same_space(reference, new)
    classes = reference.probabilities.shape[1]
    tests = [ks_2samp(reference.probabilities[:, c], new.probabilities[:, c]) for c in range(classes)]
    p_values = np.array([t.pvalue for t in tests], dtype=np.float64)
    worst = int(np.argmin(p_values))
    corrected = float(min(1.0, p_values[worst] * classes))
    return DriftResult(
        "class_ks",
        float(tests[worst].statistic),
        corrected,
        alpha,
        {"class": worst, "p_values": [float(p) for p in p_values], "correction": "bonferroni"},
    )
