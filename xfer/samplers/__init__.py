"""Which source rows a training epoch draws: `head.sampler` and `finetune.sampler`.

One file per sampler, one signature: `row_weights(labels) -> weights`, each
row's chance of being drawn, up to a constant. `uniform` draws every row once
per epoch in a seeded random order (a permutation, as before samplers existed);
the others draw as many rows as there are, with replacement, by their weights,
from the caller's seeded generator (so a resumed run that restores the
generator draws the same rows). Any of them combines with the class-balanced
loss (`class_balanced: true`), which reweights the loss instead.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from xfer.samplers import class_balanced, sqrt, uniform

SAMPLERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "uniform": uniform.row_weights,
    "class_balanced": class_balanced.row_weights,
    "sqrt": sqrt.row_weights,
}


def probabilities(name: str, labels: np.ndarray, row_weights: np.ndarray | None = None) -> np.ndarray:
    """Each row's chance per draw under sampler `name` (sums to 1), times `row_weights` where given
    (importance weights: xfer/importance.py)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {sorted(SAMPLERS)}")
    weights = np.asarray(SAMPLERS[name](np.asarray(labels)), dtype=np.float64)
    if row_weights is not None:
        weights = weights * np.asarray(row_weights, dtype=np.float64)
    return weights / weights.sum()


def epoch_rows(name: str, labels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """The row indices of one epoch, in order: a permutation (uniform) or len(labels) weighted draws."""
    if name == "uniform":
        return torch.randperm(len(labels), generator=generator)
    return torch.multinomial(torch.as_tensor(probabilities(name, labels)), len(labels), replacement=True, generator=generator)


def torch_sampler(name: str, labels: np.ndarray, generator: torch.Generator, row_weights: np.ndarray | None = None) -> WeightedRandomSampler | None:
    """A DataLoader sampler for `name` (and row weights); None for uniform without them (the DataLoader's own seeded shuffle)."""
    if name == "uniform" and row_weights is None:
        return None
    return WeightedRandomSampler(torch.as_tensor(probabilities(name, labels, row_weights)), len(labels), replacement=True, generator=generator)
