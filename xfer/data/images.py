"""Image files -> normalised tensors, for any row set of the manifest."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Preprocessing:
    """How images become the tensors the backbone expects."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


class ImageReadError(ValueError):
    """An image file is missing or cannot be decoded."""


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    # Built once per preprocessing, not once per image.
    return np.asarray(mean, np.float32).reshape(3, 1, 1), np.asarray(std, np.float32).reshape(3, 1, 1)


def to_tensor(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """A (3, size, size) float32 tensor: RGB, bilinear resize, scaled to 0..1, normalised.

    Runs once per image in every loader, so it works channel-first on
    contiguous float32 arrays (the same float32 operations in the same order
    as a per-channel torch normalisation, hence the same numbers).
    """
    size = (prep.image_size, prep.image_size)
    if img.mode == "L":
        # Resizing the one grey band and broadcasting it gives exactly the pixels of
        # resizing its RGB copy (PIL resamples every band alike), at a third of the work.
        chw = np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)[None]
    else:
        hwc = np.asarray(img.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    mean, std = _channel_stats(tuple(prep.mean), tuple(prep.std))
    return torch.from_numpy((chw / np.float32(255.0) - mean) / std)


class ImageRows(Dataset):
    """(tensor, label) for a list of image paths, resolved against `root`."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        prep: Preprocessing,
        root: str | Path = ".",
        augment: Callable[[Image.Image], Image.Image] | None = None,
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.prep = prep
        self.root = Path(root)
        # Random augmentation of the decoded image (train rows only; see xfer/data/augment.py).
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                x = to_tensor(self.augment(img) if self.augment is not None else img, self.prep)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise ImageReadError(f"cannot read image {path}: {err}") from None
        return x, self.labels[i]
