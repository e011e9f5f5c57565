"""Transferability: rank candidate frozen backbones from cached features, before any head is trained.

Each score reads one backbone's features of labelled source rows (and, for
the domain gap, unlabelled target rows) and says how well a head on them is
expected to transfer; higher is better for every score (`xfer.transferability.base`).

- `logme`: the Bayesian evidence of a linear model of the labels on the
  features (You et al., 2021). Evidence, not fit: it pays for every
  direction a fit uses, so width does not buy it. Of these scores it is the
  one the literature found to track fine-tuned accuracy most reliably, and
  the one `recommend` ranks by.
- `hscore`: the between-class share of the features' (shrunk) covariance
  (Bao et al., 2019): how far apart the class means sit for the spread.
- `knn`: held-out 5-NN accuracy on the source features: whether same-class
  rows are each other's neighbours, with nothing fitted.
- `domain_gap`: minus the proxy A-distance between source and target
  features (a domain classifier's held-out error): higher = closer domains.
  The only score that reads the target; it needs target rows.

The first three read the source only: they say how separable the labels
are in the features, not whether that carries over; the domain gap says
how far the target sits from the source in the same features.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from xfer.transferability.base import Features, Score
from xfer.transferability.domain_gap import domain_gap
from xfer.transferability.hscore import hscore
from xfer.transferability.knn import knn
from xfer.transferability.logme import logme

SCORES: dict[str, Score] = {
    "logme": logme,
    "hscore": hscore,
    "knn": knn,
    "domain_gap": domain_gap,
}
SCORE_NAMES = tuple(SCORES)

TIE = 1e-9  # LogMEs closer than this are a tie, broken by k-NN accuracy
RULE = (
    "Recommend the candidate with the highest LogME (the transferability score the literature found most reliable); "
    f"candidates whose LogME is within {TIE:g} of the best tie, and the tie goes to the higher k-NN accuracy "
    "(then to the first in the table)."
)

__all__ = ["RULE", "SCORES", "SCORE_NAMES", "Features", "Score", "score", "rank_table", "recommend"]


def score(name: str, features: Features, seed: int) -> float:
    """One score of one candidate's features; ValueError naming the valid ones for a bad name."""
    if name not in SCORES:
        raise ValueError(f"unknown transferability score {name!r}; valid: {', '.join(SCORE_NAMES)}")
    return float(SCORES[name](features, seed))


def rank_table(candidates: dict[str, Features], seed: int, names: Sequence[str] = SCORE_NAMES) -> list[dict]:
    """One row per candidate, in the given order: {"candidate": name, score name: value, ...}."""
    return [{"candidate": candidate, **{name: score(name, features, seed) for name in names}} for candidate, features in candidates.items()]


def recommend(rows: Sequence[dict]) -> tuple[str, str]:
    """The candidate `RULE` picks from `rank_table` rows, and the rule with the pick as plain text."""
    if not rows:
        raise ValueError("no candidates to recommend from")

    def logme_of(row: dict) -> float:
        return -np.inf if np.isnan(row["logme"]) else row["logme"]  # a failed score never wins

    best = max(logme_of(row) for row in rows)
    tied = [row for row in rows if logme_of(row) >= best - TIE]
    chosen = max(tied, key=lambda row: row["knn"])  # max keeps the first of equal k-NN accuracies
    why = f"{chosen['candidate']!r}: LogME {chosen['logme']:.6g}"
    if len(tied) > 1:
        why += f", tied with {', '.join(repr(row['candidate']) for row in tied if row is not chosen)}; k-NN accuracy {chosen['knn']:.4g}"
    return chosen["candidate"], f"{RULE} Chosen {why}."
