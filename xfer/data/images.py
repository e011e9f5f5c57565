"""Image files -> normalised tensors, for any row set of the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from xfer.backbones import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ImageReadError(ValueError):
    """An image file is missing or cannot be decoded."""


def check_image(path: str | Path) -> None:
    """Decode `path` fully; raise ImageReadError naming the file if that fails."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from None


def to_tensor(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    img = img.convert("RGB").resize((prep.image_size, prep.image_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (x - mean) / std


class ImageRows(Dataset):
    """(tensor, label) for a list of image paths, resolved against `root`."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], prep: Preprocessing, root: str | Path = "."):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = [int(v) for v in labels]
        self.prep = prep
        self.root = Path(root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                x = to_tensor(img, self.prep)
        except (OSError, UnidentifiedImageError) as err:
            raise ImageReadError(f"cannot read image {path}: {err}") from None
        return x, self.labels[i]
