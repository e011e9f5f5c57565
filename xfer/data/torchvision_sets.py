"""Datasets torchvision reads (MNIST, USPS, SVHN) -> <domain>/<class>/<image>.png.

    archives downloaded and verified against the registry's digests, all of them
    before any image is written -> placed where torchvision looks for them (in a
    temporary root beside the downloads) -> read with the torchvision classes
    (download=False: torchvision itself never touches the network)
    -> every image of the train and test splits written as a PNG under
    staging/<domain>/<label>/<split>_<index>.png

The PNGs are then found, decoded and hashed by fetch.py like any other
dataset's images; this module only turns torchvision's readers into folders.
The file names keep the split and the index torchvision gives the image, so
any PNG can be traced back to `Dataset(split)[index]`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torchvision
from PIL import Image
from torchvision.datasets import MNIST, SVHN, USPS
from torchvision.datasets.utils import calculate_md5
from tqdm.auto import tqdm

from xfer.data.download import ChecksumError
from xfer.data.fetch import obtain_archive
from xfer.data.sources import Archive, DatasetSource

SPLITS = ("train", "test")
CLASSES = tuple(str(digit) for digit in range(10))  # all three are digit datasets; class folders "0".."9"

__all__ = ["ChecksumError", "ExportError", "TORCHVISION", "export_torchvision", "write_images"]


class ExportError(ValueError):
    """A verified file torchvision cannot read as the dataset it should be: retrying will not help."""


@dataclass(frozen=True)
class TorchvisionSet:
    """What one torchvision dataset class needs: the files the archives must supply, and its image mode."""

    files: tuple[str, ...]  # archive file names, as the registry's URLs end
    mode: str  # PIL mode of the images torchvision returns: "L" (grayscale) or "RGB"


# File names from torchvision's own class attributes, so a torchvision upgrade
# that renames a file fails here, naming the file, rather than deep in a reader.
TORCHVISION = {
    "mnist": TorchvisionSet(tuple(name for name, _ in MNIST.resources), "L"),
    "usps": TorchvisionSet(tuple(USPS.split_list[s][1] for s in SPLITS), "L"),
    "svhn": TorchvisionSet(tuple(SVHN.split_list[s][1] for s in SPLITS), "RGB"),
}


def export_torchvision(source: DatasetSource, downloads: Path, staging: Path, *, progress: bool = True) -> dict[str, int]:
    """Fill the empty folder `staging` with <dataset>/<label>/<split>_<index>.png; returns {dataset: images}.

    Exports each dataset (the archives' `domain`) that `source.domains` names a
    folder of. Every archive is downloaded and verified before the first image is
    written, so a checksum error leaves `staging` empty; so does any later error.
    """
    downloads, staging = Path(downloads), Path(staging)
    if any(staging.iterdir()):
        raise ValueError(f"{staging}: the staging folder must be empty, it holds {sorted(p.name for p in staging.iterdir())}")
    groups = archives_by_dataset(source)
    downloads.mkdir(parents=True, exist_ok=True)
    files = {name: {a.filename: obtain_archive(a, Path("."), downloads, progress) for a in archives} for name, archives in groups.items()}
    counts = {}
    # The torchvision roots hold links or decompressed copies: temporary, and on
    # the downloads' filesystem so that linking works.
    with tempfile.TemporaryDirectory(prefix=".torchvision-", dir=downloads) as tmp:
        try:
            for name, paths in files.items():
                root = Path(tmp) / name
                place_files(name, paths, root)
                counts[name] = write_dataset(name, root, staging / name, progress)
        except BaseException:
            empty_folder(staging)
            raise
    return counts


def archives_by_dataset(source: DatasetSource) -> dict[str, list[Archive]]:
    """{dataset: its archives}, for the datasets `source.domains` uses; ValueError naming what is wrong.

    source.domains maps each domain to a folder inside staging; the folder's first
    part is the dataset written there (the registry's `mnist: mnist`, or a
    user's `source: mnist`). A dataset no domain uses is neither downloaded nor written.
    """
    groups: dict[str, list[Archive]] = {}
    for archive in source.archives:
        if archive.domain not in TORCHVISION:
            raise ValueError(
                f"{source.name}: archive {archive.location} has domain {archive.domain!r}; a torchvision archive must name one of {sorted(TORCHVISION)}"
            )
        groups.setdefault(archive.domain, []).append(archive)
    if source.domains is None:
        wanted = set(groups)
    else:
        wanted = {PurePosixPath(folder).parts[0] for folder in source.domains.values() if PurePosixPath(folder).parts}
    missing = wanted - set(groups)
    if missing:
        raise ValueError(f"{source.name}: data.domains {source.domains} names folder(s) {sorted(missing)}, but the archives provide only {sorted(groups)}")
    for name in sorted(wanted):
        have = {a.filename for a in groups[name]}
        lacking = [f for f in TORCHVISION[name].files if f not in have]
        if lacking:
            raise ValueError(
                f"{source.name}: torchvision {torchvision.__version__} reads {name} from {list(TORCHVISION[name].files)}; "
                f"no archive supplies {lacking} (the archives give {sorted(have)})"
            )
    return {name: archives for name, archives in groups.items() if name in wanted}


def place_files(name: str, paths: dict[str, Path], root: Path) -> None:
    """Put the verified files where torchvision 0.29.1 looks for them under `root`.

    MNIST reads <root>/MNIST/raw/<name without .gz>, uncompressed; USPS and SVHN
    read <root>/<file name> as downloaded.
    """
    if name == "mnist":
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for filename in TORCHVISION[name].files:
            gunzip(paths[filename], raw / filename.removesuffix(".gz"))
        return
    root.mkdir(parents=True)
    for filename in TORCHVISION[name].files:
        link_or_copy(paths[filename], root / filename)


def gunzip(src: Path, dest: Path) -> None:
    """Decompress one .gz; ExportError naming the file if it is not gzip (MNIST's files must be)."""
    try:
        with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except (gzip.BadGzipFile, EOFError) as e:
        raise ExportError(f"{src}: expected a gzip-compressed MNIST file ({dest.name}.gz): {e}") from e


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link (SVHN's train file is 182 MB: no copy), or a copy where links are refused."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def open_split(name: str, root: Path, split: str) -> Sequence:
    """torchvision's dataset for one split, read from `root` (download=False: no network)."""
    try:
        if name == "mnist":
            return MNIST(root, train=split == "train", download=False)
        if name == "usps":
            return USPS(root, train=split == "train", download=False)
        if name == "svhn":
            return SVHN(root, split=split, download=False)
    except Exception as e:
        raise read_error(name, root, split, e) from e
    raise ValueError(f"no torchvision reader for {name!r}; known: {sorted(TORCHVISION)}")


def read_error(name: str, root: Path, split: str, error: Exception) -> ExportError:
    """Why torchvision could not read a split, naming the file and what was expected.

    SVHN checks its own md5 even with download=False. The file has already
    matched the registry's sha256, so a refusal there means the registry and
    torchvision disagree about which file SVHN is.
    """
    if name == "svhn":
        path = root / SVHN.split_list[split][1]
        expected = SVHN.split_list[split][2]
        actual = calculate_md5(path) if path.is_file() else "no such file"
        if actual != expected:
            return ExportError(
                f"svhn {split}: {path.name} matches the registry's digest, but torchvision {torchvision.__version__} "
                f"only reads the file whose md5 is {expected} (got {actual}): the registry entry and torchvision disagree"
            )
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return ExportError(f"{name} {split}: torchvision {torchvision.__version__} cannot read {files} in {root}: {error!r}")


def write_dataset(name: str, root: Path, out: Path, progress: bool) -> int:
    """Both splits of one dataset, pooled under out/<label>/ (the split stays in the file name)."""
    return sum(write_images(open_split(name, root, split), out, split, TORCHVISION[name].mode, progress=progress, desc=f"{name} {split}") for split in SPLITS)


def write_images(samples: Sequence, out: Path, prefix: str, mode: str, *, progress: bool = True, desc: str = "") -> int:
    """Write samples[i] = (PIL image, label) as out/<label>/<prefix>_<i>.png; returns how many.

    Images are saved as torchvision returns them; one in another mode than
    `mode`, or a label outside 0..9, means the reader is not the dataset this
    module expects, and stops the export rather than writing wrong classes.
    """
    out = Path(out)
    width = max(5, len(str(len(samples) - 1)))
    made: set[str] = set()
    for i in tqdm(range(len(samples)), desc=desc or prefix, unit="img", disable=not progress):
        image, label = samples[i]
        if not isinstance(image, Image.Image) or image.mode != mode:
            got = image.mode if isinstance(image, Image.Image) else type(image).__name__
            raise ExportError(f"{desc or prefix}: image {i} should be a PIL image in mode {mode!r}, got {got!r}")
        folder = str(label)
        if folder not in CLASSES:
            raise ExportError(f"{desc or prefix}: image {i} has label {label!r}; expected one of {list(CLASSES)}")
        if folder not in made:
            (out / folder).mkdir(parents=True, exist_ok=True)
            made.add(folder)
        image.save(out / folder / f"{prefix}_{i:0{width}d}.png", format="PNG")
    return len(samples)


def empty_folder(folder: Path) -> None:
    """Remove everything inside `folder` (what a failed export wrote), keeping the folder itself."""
    for child in Path(folder).iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
