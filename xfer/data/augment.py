"""Random image augmentations for fine-tuning, set in params, applied on the fly to train rows only.

They act on the decoded PIL image before the usual resize and normalisation
(xfer/data/images.py), draw from torch's generator (so a resumed run draws
the same ones), and are a picklable object, so DataLoader workers can use them.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from xfer.config import AugmentConfig


class Augmentation:
    """crop -> flip -> rotation -> colour jitter, each only if its knob is on."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self.jitter = T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter) if cfg.color_jitter else None

    def __call__(self, img: Image.Image) -> Image.Image:
        cfg = self.cfg
        if cfg.crop_scale is not None:
            top, left, height, width = T.RandomResizedCrop.get_params(img, scale=(cfg.crop_scale, 1.0), ratio=(3 / 4, 4 / 3))
            img = F.resized_crop(img, top, left, height, width, [img.height, img.width], antialias=True)
        if cfg.flip and _uniform() < 0.5:
            img = F.hflip(img)
        if cfg.rotation_deg:
            angle = float((_uniform() * 2 - 1) * cfg.rotation_deg)
            img = F.rotate(img, angle, interpolation=T.InterpolationMode.BILINEAR)
        if self.jitter is not None:
            img = self.jitter(img.convert("RGB"))
        return img

    def __repr__(self) -> str:
        return f"Augmentation({self.cfg!r})"


def _uniform() -> float:
    return torch.rand(()).item()


def build_augmentation(cfg: AugmentConfig) -> Augmentation | None:
    """None when every knob is off: train rows then load exactly like val and test rows."""
    if cfg.crop_scale is None and not cfg.flip and not cfg.rotation_deg and not cfg.color_jitter:
        return None
    return Augmentation(cfg)
