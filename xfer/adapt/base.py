"""What every adaptation loss looks like to the training loops that use it."""

from __future__ import annotations

import torch
from torch import nn


class AdaptationLoss(nn.Module):
    """A loss on one labelled source batch and one unlabelled target batch.

    `features_*` are the representation being adapted (the head's hidden
    layer on cached features, the backbone's pooled output when fine-tuning);
    `logits_*` the classifier's outputs on them. Target labels never enter.
    """

    #: True when the loss moves the features themselves, so there must be a trainable layer below it.
    aligns_features = False

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1], for losses with a schedule (the adversarial ones)."""

    #: True when `refresh` does something; the trainer then embeds the whole target set each epoch.
    @property
    def wants_refresh(self) -> bool:
        return False

    def refresh(self, features_t: torch.Tensor, logits_t: torch.Tensor) -> None:
        """Once per epoch, the whole unlabelled target set (no gradient), for losses that label it."""

    def forward(
        self, features_s: torch.Tensor, features_t: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor, index_t: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`index_t`: the batch's row numbers in the target set given to `refresh`."""
        raise NotImplementedError


def warm_start(progress: float, alpha: float = 10.0) -> float:
    """0 -> 1 along 2 / (1 + exp(-alpha p)) - 1 (Ganin et al.): weak signals while the classifier is still random."""
    return float(2.0 / (1.0 + torch.exp(torch.tensor(-alpha * progress))) - 1.0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of probability rows."""
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(1)


def certainty_weights(probs: torch.Tensor) -> torch.Tensor:
    """1 + exp(-entropy), rescaled to mean 1: confident rows count more (CDAN-E, MCC)."""
    w = 1.0 + torch.exp(-entropy(probs))
    return w * (len(w) / w.sum())
