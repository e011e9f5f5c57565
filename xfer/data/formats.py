"""Which files are images, and which may be opened: a module of its own so that listing a dataset never imports torch."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def set_max_image_pixels(limit: int) -> None:
    """Images with more pixels than `limit` are decompression bombs (data.max_image_pixels).

    PIL refuses twice its limit by itself and only warns between; `check_pixels`
    refuses everything above it, so the warning says nothing more.
    """
    Image.MAX_IMAGE_PIXELS = int(limit)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def check_pixels(img: Image.Image) -> None:
    """Raise PIL's DecompressionBombError if `img` (opened, not decoded) has more pixels than the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} = {img.width * img.height} pixels, more than data.max_image_pixels "
            f"({limit}); a decompression bomb? Raise data.max_image_pixels if the image is genuine"
        )


def regular_file_problem(path: str | Path) -> str | None:
    """Why `path` is not a regular file that can be read (following links), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling link" if os.path.islink(path) else "not found"
    except OSError as err:
        return f"cannot be looked at ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return f"{kind}, not a regular file"
