"""Model selection without target labels: one file per validator, one signature.

A validator scores candidates (epochs of a run, or the methods of a search)
from their predictions on unlabelled target rows and labelled source val
rows; higher is better (`xfer.validators.base`). `target_val` is not here: it
reads target labels, so it is the oracle rule, named apart wherever it is used.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from xfer.validators.base import Evidence, Outputs, Validator
from xfer.validators.bnm import bnm
from xfer.validators.class_ami import class_ami
from xfer.validators.dev import dev
from xfer.validators.ensv import ensv
from xfer.validators.entropy import entropy
from xfer.validators.info_max import info_max
from xfer.validators.snd import snd
from xfer.validators.soft_info_max import soft_info_max
from xfer.validators.source_val import source_val

VALIDATORS: dict[str, Validator] = {
    "source_val": source_val,
    "entropy": entropy,
    "info_max": info_max,
    "soft_info_max": soft_info_max,
    "bnm": bnm,
    "snd": snd,
    "dev": dev,
    "class_ami": class_ami,
    "ensv": ensv,
}
VALIDATOR_NAMES = tuple(VALIDATORS)

__all__ = ["VALIDATORS", "VALIDATOR_NAMES", "Evidence", "Outputs", "Validator", "score", "panel"]


def score(name: str, candidates: Sequence[Outputs], evidence: Evidence) -> np.ndarray:
    """One validator's scores, one per candidate; ValueError naming the valid ones for a bad name."""
    if name not in VALIDATORS:
        raise ValueError(f"unknown validator {name!r}; valid: {', '.join(VALIDATOR_NAMES)}")
    return VALIDATORS[name](candidates, evidence)


def panel(candidates: Sequence[Outputs], evidence: Evidence, names: Sequence[str] = VALIDATOR_NAMES) -> dict[str, np.ndarray]:
    """Every named validator's scores for the candidates."""
    return {name: score(name, candidates, evidence) for name in names}
