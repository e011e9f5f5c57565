"""What every drift test sees: a reference window and a window of new images, and what it answers.

A window is what the served model makes of some images: the features its
backbone gives them and the class probabilities it predicts. The reference
window is the target data the model was adapted to (saved when it was
trained); the new window is what it receives now. A test answers with a
p-value under "the new images come from the reference distribution"; drift is
p < alpha. Tests are seeded, so the same windows always give the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class DriftError(ValueError):
    """A window a drift test cannot use; the message names what is wrong."""


@dataclass(frozen=True)
class Window:
    """Features (n, d) and class probabilities (n, C) of n images, row for row."""

    features: np.ndarray
    probabilities: np.ndarray

    def __post_init__(self):
        f, p = np.asarray(self.features), np.asarray(self.probabilities)
        if f.ndim != 2 or p.ndim != 2 or len(f) != len(p):
            raise DriftError(f"a window needs features (n, d) and probabilities (n, C) of the same n rows, got {f.shape} and {p.shape}")
        if len(f) < MIN_ROWS:
            raise DriftError(f"a window of {len(f)} images is too small to test: at least {MIN_ROWS}")
        if not (np.isfinite(f).all() and np.isfinite(p).all()):
            raise DriftError("a window holds non-finite features or probabilities")
        object.__setattr__(self, "features", f.astype(np.float64, copy=False))
        object.__setattr__(self, "probabilities", p.astype(np.float64, copy=False))

    def __len__(self) -> int:
        return len(self.features)


# Below this a two-sample test has next to no power, and the classifier test cannot hold out rows.
MIN_ROWS = 5


@dataclass(frozen=True)
class DriftResult:
    """One test's answer: its statistic, the p-value, and whether that is drift at `alpha`."""

    test: str
    statistic: float
    p_value: float
    alpha: float
    detail: dict = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return self.p_value < self.alpha

    def as_dict(self) -> dict:
        return {"test": self.test, "statistic": self.statistic, "p_value": self.p_value, "alpha": self.alpha, "drift": self.drift, **self.detail}


class DriftTest(Protocol):
    def __call__(self, reference: Window, new: Window, *, alpha: float, seed: int) -> DriftResult: ...


def check_same_space(reference: Window, new: Window) -> None:
    if reference.features.shape[1] != new.features.shape[1] or reference.probabilities.shape[1] != new.probabilities.shape[1]:
        raise DriftError(
            f"the windows come from different models: features of {reference.features.shape[1]} and {new.features.shape[1]} "
            f"dims, {reference.probabilities.shape[1]} and {new.probabilities.shape[1]} classes"
        )


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #null >= observed) / (1 + #null): never 0, exact under exchangeability."""
    return float((1 + np.count_nonzero(null >= observed)) / (1 + len(null)))
