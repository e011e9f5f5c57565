"""DANN (Ganin et al., 2016): features that fool a domain discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xfer.adapt.base import AdaptationLoss, warm_start


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff: float):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; gradient times -coeff backward."""
    return _ReverseGradient.apply(x, coeff)


class DomainDiscriminator(nn.Sequential):
    """Features -> one logit: source (1) or target (0)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden_dim, 1),
        )


def domain_bce(domain_logits_s: torch.Tensor, domain_logits_t: torch.Tensor, weight_s=None, weight_t=None) -> torch.Tensor:
    """Binary cross-entropy of the discriminator: source labelled 1, target 0, each domain weighted equally."""
    loss_s = F.binary_cross_entropy_with_logits(domain_logits_s.squeeze(1), torch.ones_like(domain_logits_s.squeeze(1)), weight=weight_s)
    loss_t = F.binary_cross_entropy_with_logits(domain_logits_t.squeeze(1), torch.zeros_like(domain_logits_t.squeeze(1)), weight=weight_t)
    return 0.5 * (loss_s + loss_t)


class DomainAdversarialLoss(AdaptationLoss):
    """The discriminator minimises this loss; through the reversed gradient, the features maximise it.

    The reversal coefficient ramps from 0 to 1 over training (`set_progress`),
    so early, random features are not pushed around by a random discriminator.
    """

    aligns_features = True

    def __init__(self, feature_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.discriminator = DomainDiscriminator(feature_dim, hidden_dim)
        self.coeff = 0.0

    def set_progress(self, progress: float) -> None:
        self.coeff = warm_start(progress)

    def forward(self, features_s, features_t, logits_s=None, logits_t=None, index_t=None):
        d_s = self.discriminator(reverse_gradient(features_s, self.coeff))
        d_t = self.discriminator(reverse_gradient(features_t, self.coeff))
        return domain_bce(d_s, d_t)

    @torch.no_grad()
    def domain_accuracy(self, features_s: torch.Tensor, features_t: torch.Tensor) -> float:
        correct = (self.discriminator(features_s) > 0).sum() + (self.discriminator(features_t) <= 0).sum()
        return float(correct) / (len(features_s) + len(features_t))
