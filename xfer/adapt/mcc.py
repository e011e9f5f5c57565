"""MCC (Jin et al., 2020): minimum class confusion on unlabelled target predictions."""

from __future__ import annotations

import torch.nn.functional as F

from xfer.adapt.base import AdaptationLoss, certainty_weights


class MinimumClassConfusionLoss(AdaptationLoss):
    """How much probability mass the target batch puts on pairs of different classes.

    Predictions are softened by `temperature`, rows weighted by certainty,
    and the class-correlation matrix row-normalised so frequent classes do
    not dominate; the loss is its off-diagonal mass per class.
    """

    def __init__(self, temperature: float = 2.5):
        super().__init__()
        self.temperature = temperature

    def forward(self, features_s, features_t, logits_s, logits_t, index_t=None):
        probs = F.softmax(logits_t / self.temperature, 1)
        weights = certainty_weights(probs.detach())
        confusion = (probs * weights.unsqueeze(1)).T @ probs
        confusion = confusion / confusion.sum(1, keepdim=True)
        num_classes = probs.shape[1]
        return (confusion.sum() - confusion.trace()) / num_classes
