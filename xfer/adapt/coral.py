"""Deep CORAL (Sun & Saenko, 2016): match the first two moments of the features."""

from __future__ import annotations

import torch

from xfer.adapt.base import AdaptationLoss


def _covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / max(len(x) - 1, 1)


class CoralLoss(AdaptationLoss):
    """||mean_s - mean_t||^2 + ||Cov_s - Cov_t||_F^2 / (4 d^2), per batch.

    The mean term is not in the paper's loss; without it a constant offset
    between domains, the commonest shift in frozen features, goes unpunished.
    Both domains are first divided by their joint root-mean-square, so the
    loss cannot be lowered by shrinking every feature towards zero (with a
    trainable layer and a growing classifier, that is the easy way out).
    """

    aligns_features = True

    def forward(self, features_s, features_t, logits_s=None, logits_t=None, index_t=None):
        d = features_s.shape[1]
        scale = torch.cat([features_s, features_t]).pow(2).mean().sqrt().clamp_min(1e-6)
        features_s, features_t = features_s / scale, features_t / scale
        mean_gap = (features_s.mean(0) - features_t.mean(0)).pow(2).mean()
        cov_gap = (_covariance(features_s) - _covariance(features_t)).pow(2).sum() / (4 * d * d)
        return mean_gap + cov_gap
