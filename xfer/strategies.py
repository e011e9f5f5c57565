"""Which backbone weights train, and at what learning rate: the fine-tuning strategies.

The backbone is cut into timm's coarse parameter groups, bottom to top
(for EfficientNet: the stem, then one group per stage): `partial` freezes
the first k, `gradual` unfreezes them top-down at epoch milestones,
`head_only` freezes all, `full` and `lp_ft` train all. Frozen weights get no
gradient, so the optimiser never touches them (weight decay included), and
their BatchNorm layers stay on their running statistics.
"""

from __future__ import annotations

from torch import nn

from xfer.config import FinetuneConfig

# Strategies whose classifier starts from the linear probe on cached features;
# `full` starts from a fresh one (the textbook baseline LP-FT improves on).
PROBE_STARTED = ("head_only", "partial", "lp_ft", "gradual")


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone, grouped bottom (stem) to top; one group if not a timm model."""
    names = [name for name, _ in backbone.named_parameters()]
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return [names]
    from timm.models import group_parameters

    groups = group_parameters(backbone, matcher(coarse=True))
    ordered = [list(groups[k]) for k in sorted(groups)]
    assert sorted(n for g in ordered for n in g) == sorted(names), "timm grouping lost parameters"
    return ordered


def check_strategy(cfg: FinetuneConfig, backbone: nn.Module) -> None:
    """`partial` freezes fewer groups than the backbone has; ValueError naming the count otherwise."""
    n = len(backbone_groups(backbone))
    if cfg.strategy == "partial" and cfg.frozen_blocks >= n:
        raise ValueError(
            f"finetune.frozen_blocks is {cfg.frozen_blocks} but the backbone has {n} block groups; "
            f"freeze at most {n - 1} (or use strategy head_only to freeze them all)"
        )


def frozen_groups(cfg: FinetuneConfig, n_groups: int, epoch: int) -> int:
    """How many groups, counted from the bottom, are frozen during `epoch` (1-based)."""
    if cfg.strategy == "head_only":
        return n_groups
    if cfg.strategy == "partial":
        return cfg.frozen_blocks
    if cfg.strategy == "gradual":
        unfrozen = (epoch - 1) // cfg.unfreeze_every
        return max(0, n_groups - unfrozen)
    return 0


def apply_freezing(backbone: nn.Module, groups: list[list[str]], n_frozen: int) -> None:
    """requires_grad off for the first n_frozen groups, on for the rest; their BatchNorms to eval."""
    frozen = {name for group in groups[:n_frozen] for name in group}
    for name, param in backbone.named_parameters():
        param.requires_grad_(name not in frozen)
    for module_name, module in backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if own and all(name in frozen for name in own):
                module.eval()


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Optimiser groups: layer-wise decayed learning rates down the backbone, head at lr * head_lr_scale.

    Group i of n trains at lr * layer_decay ** (n - i): the top block at
    lr * decay, the stem at the smallest rate. With layer_decay 1 every backbone
    weight trains at lr.
    """
    groups = backbone_groups(model.backbone)
    named = dict(model.backbone.named_parameters())
    out = []
    for i, names in enumerate(groups):
        scale = cfg.layer_decay ** (len(groups) - i) if cfg.layer_decay != 1 else 1.0
        out.append({"params": [named[n] for n in names], "lr": cfg.lr * scale, "name": f"backbone.{i}"})
    out.append({"params": list(model.head.parameters()), "lr": cfg.lr * cfg.head_lr_scale, "name": "head"})
    return out
