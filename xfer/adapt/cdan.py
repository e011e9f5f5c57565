"""CDAN (Long et al., 2018): adversarial alignment conditioned on the classifier's predictions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xfer.adapt.base import AdaptationLoss, certainty_weights, warm_start
from xfer.adapt.dann import DomainDiscriminator, domain_bce, reverse_gradient


class MultilinearMap(nn.Module):
    """f (x) g, the outer product of features and class probabilities, flattened.

    Above `max_dim` outputs it becomes the randomized map of the paper,
    (f R_f) * (g R_g) / sqrt(d), with fixed random matrices, so a 1280-dim
    backbone with many classes stays affordable.
    """

    def __init__(self, feature_dim: int, num_classes: int, max_dim: int = 4096, random_dim: int = 1024, seed: int = 0):
        super().__init__()
        self.randomized = feature_dim * num_classes > max_dim
        self.out_dim = random_dim if self.randomized else feature_dim * num_classes
        if self.randomized:
            gen = torch.Generator().manual_seed(seed)
            self.register_buffer("r_f", torch.randn(feature_dim, random_dim, generator=gen))
            self.register_buffer("r_g", torch.randn(num_classes, random_dim, generator=gen))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            return (f @ self.r_f) * (g @ self.r_g) / math.sqrt(self.out_dim)
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)


class ConditionalDomainAdversarialLoss(AdaptationLoss):
    """DANN on f (x) softmax(logits); with `entropy_conditioning` (CDAN+E), confident rows weigh more."""

    aligns_features = True

    def __init__(self, feature_dim: int, num_classes: int, hidden_dim: int = 256, entropy_conditioning: bool = True):
        super().__init__()
        self.map = MultilinearMap(feature_dim, num_classes)
        self.discriminator = DomainDiscriminator(self.map.out_dim, hidden_dim)
        self.entropy_conditioning = entropy_conditioning
        self.coeff = 0.0

    def set_progress(self, progress: float) -> None:
        self.coeff = warm_start(progress)

    def forward(self, features_s, features_t, logits_s, logits_t, index_t=None):
        # Predictions condition the discriminator; they are not trained through it.
        g_s, g_t = F.softmax(logits_s, 1).detach(), F.softmax(logits_t, 1).detach()
        h_s = self.map(reverse_gradient(features_s, self.coeff), g_s)
        h_t = self.map(reverse_gradient(features_t, self.coeff), g_t)
        w_s = certainty_weights(g_s) if self.entropy_conditioning else None
        w_t = certainty_weights(g_t) if self.entropy_conditioning else None
        return domain_bce(self.discriminator(h_s), self.discriminator(h_t), w_s, w_t)
