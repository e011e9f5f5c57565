"""Generated multi-domain image folders and archives for the dataset tests (real image files)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "owl")


def write_image(path: Path, seed: int, size: int = 12, fmt: str | None = None) -> Path:
    """A distinct random RGB image (distinct seeds give distinct bytes)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def image_folder(root: Path, domains: dict[str, int], classes=CLASSES, wrapper: str = "", inner: str = "", suffix: str = ".png", seed: int = 0) -> Path:
    """root/[wrapper/]<domain>/[inner/]<class>/<i><suffix>, `domains` = {domain: images per class}."""
    base = root / wrapper if wrapper else root
    n = seed * 100000
    for domain, per_class in domains.items():
        for c in classes:
            for i in range(per_class):
                n += 1
                write_image(base / domain / inner / c / f"{i:03d}{suffix}", n)
    return root


def zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return dest


def tar_folder(folder: Path, dest: Path, mode: str = "w:gz") -> Path:
    with tarfile.open(dest, mode) as tf:
        for path in sorted(folder.iterdir()):
            tf.add(path, path.name)
    return dest


def add_tar_member(archive: Path, name: str, data: bytes = b"x", mode: str = "w:gz", symlink_to: str | None = None) -> None:
    """Rewrite `archive` with one more member (a file or a symlink) under `name`."""
    with tarfile.open(archive) as old:
        members = [(m, old.extractfile(m).read() if m.isfile() else None) for m in old.getmembers()]
    with tarfile.open(archive, mode) as tf:
        for member, content in members:
            tf.addfile(member, io.BytesIO(content) if content is not None else None)
        info = tarfile.TarInfo(name)
        if symlink_to is not None:
            info.type, info.linkname = tarfile.SYMTYPE, symlink_to
            tf.addfile(info)
        else:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
