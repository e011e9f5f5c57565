"""Domain adaptation: one file per method, each loss a small nn.Module.

Every loss has the signature of `AdaptationLoss.forward` (source and target
features, source and target logits), so the same module trains a head on
cached features and a whole network while fine-tuning.
"""

from __future__ import annotations

from xfer.adapt.base import AdaptationLoss
from xfer.adapt.cdan import ConditionalDomainAdversarialLoss
from xfer.adapt.coral import CoralLoss
from xfer.adapt.dann import DomainAdversarialLoss
from xfer.adapt.mcc import MinimumClassConfusionLoss
from xfer.adapt.mmd import MultiKernelMMD
from xfer.adapt.self_training import PseudoLabelLoss

__all__ = [
    "AdaptationLoss",
    "ConditionalDomainAdversarialLoss",
    "CoralLoss",
    "DomainAdversarialLoss",
    "MinimumClassConfusionLoss",
    "MultiKernelMMD",
    "PseudoLabelLoss",
    "build_adaptation_loss",
]


def build_adaptation_loss(
    method: str,
    feature_dim: int,
    num_classes: int,
    *,
    pseudo_threshold: float = 0.9,
    pseudo_labels: str = "confidence",
    mcc_temperature: float = 2.5,
) -> AdaptationLoss | None:
    """The loss for `method` (a name from xfer.config.ADAPTATION_METHODS); None for source_only."""
    if method == "source_only":
        return None
    if method == "coral":
        return CoralLoss()
    if method == "mmd":
        return MultiKernelMMD()
    if method == "dann":
        return DomainAdversarialLoss(feature_dim)
    if method == "cdan":
        return ConditionalDomainAdversarialLoss(feature_dim, num_classes)
    if method == "mcc":
        return MinimumClassConfusionLoss(mcc_temperature)
    if method == "self_training":
        return PseudoLabelLoss(pseudo_threshold, pseudo_labels)
    raise ValueError(f"unknown adaptation method {method!r}")
