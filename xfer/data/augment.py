"""Random image augmentations for fine-tuning, set in params, applied on the fly to train rows only.

They act on the decoded PIL image before the usual resize and normalisation
(xfer/data/images.py), draw from torch's generator (so a resumed run draws
the same ones), and are a picklable object, so DataLoader workers can use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from xfer.config import AugmentConfig


def fourier_amplitude_swap(source: np.ndarray, target: np.ndarray, beta: float) -> np.ndarray:
    """FDA (Yang & Soatto, 2020): `source` with the low-frequency amplitude of `target`, its own phase.

    Both (H, W) or (H, W, C) of one shape, values 0..255. The window is the centred
    (2b + 1) x (2b + 1) square of the shifted spectrum, b = floor(beta * min(H, W)):
    b = 0 swaps the mean (DC) alone. The result is clipped to 0..255.
    """
    if source.shape != target.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} images must have one shape")
    axes = (0, 1)
    spectrum = np.fft.fftshift(np.fft.fft2(source.astype(np.float64), axes=axes), axes=axes)
    target_amplitude = np.abs(np.fft.fftshift(np.fft.fft2(target.astype(np.float64), axes=axes), axes=axes))
    amplitude, phase = np.abs(spectrum), np.angle(spectrum)
    h, w = source.shape[:2]
    b = int(np.floor(beta * min(h, w)))
    rows, cols = slice(h // 2 - b, h // 2 + b + 1), slice(w // 2 - b, w // 2 + b + 1)
    amplitude[rows, cols] = target_amplitude[rows, cols]
    swapped = np.fft.ifft2(np.fft.ifftshift(amplitude * np.exp(1j * phase), axes=axes), axes=axes)
    return np.clip(np.real(swapped), 0, 255)


class FourierStyle:
    """A source image in a random target image's low-frequency "style" (finetune.augment.fda: beta).

    The target image (one of `paths`, the unlabelled target train rows: never val or
    test) is drawn from torch's generator like every other augmentation, read in the
    source image's mode and resized to its size.
    """

    def __init__(self, beta: float, paths: Sequence[str], root: str | Path):
        if not paths:
            raise ValueError("finetune.augment.fda needs unlabelled target train images to take the style of; the manifest has none")
        self.beta, self.paths, self.root = beta, list(paths), Path(root)

    def __call__(self, img: Image.Image) -> Image.Image:
        mode = img.mode if img.mode in ("L", "RGB") else "RGB"
        source = img.convert(mode)
        with Image.open(self.root / self.paths[int(torch.randint(len(self.paths), ()).item())]) as t:
            target = t.convert(mode).resize(source.size, Image.Resampling.BILINEAR)
        return Image.fromarray(fourier_amplitude_swap(np.asarray(source), np.asarray(target), self.beta).round().astype(np.uint8), mode)

    def __repr__(self) -> str:
        return f"FourierStyle(beta={self.beta}, {len(self.paths)} target images)"


class Augmentation:
    """crop -> flip -> rotation -> colour jitter -> Fourier style (source images only), each only if its knob is on."""

    def __init__(self, cfg: AugmentConfig, style: FourierStyle | None = None):
        self.cfg = cfg
        self.jitter = T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter) if cfg.color_jitter else None
        self.style = style

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
        if self.style is not None:
            img = self.style(img)
        return img

    def __repr__(self) -> str:
        return f"Augmentation({self.cfg!r}, style={self.style!r})"


def _uniform() -> float:
    return torch.rand(()).item()


def build_augmentation(cfg: AugmentConfig, style: FourierStyle | None = None) -> Augmentation | None:
    """None when every knob is off: train rows then load exactly like val and test rows.

    `style` (FDA) is given for the source train rows only, and only with `cfg.fda` set.
    """
    if cfg.crop_scale is None and not cfg.flip and not cfg.rotation_deg and not cfg.color_jitter and style is None:
        return None
    return Augmentation(cfg, style)
