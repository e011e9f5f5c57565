"""Fetch any dataset into data/raw/<name>/<domain>/<class>/<image>, validated.

    source (sources.py) -> archives downloaded and verified (download.py)
    -> unpacked safely (archives.py) -> domains and classes found (normalise.py)
    -> every image decoded and hashed (validate.py) -> published by one rename.

Besides the images, data/raw/<name>/ holds `images.csv` (the catalog the
split stage reads), `validation.json` (the report) and `dataset.json` (where
it came from, counts). A failure anywhere leaves the previous data/raw/<name>
as it was, and no partial folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pandas as pd

from xfer.config import DataConfig
from xfer.data.archives import extract_archive
from xfer.data.download import ChecksumError, download
from xfer.data.formats import set_max_image_pixels
from xfer.data.normalise import check_classes, find_domains, list_domain, place, plan_images
from xfer.data.sources import Archive, DatasetSource, check_source, local_path, resolve_source
from xfer.data.validate import CATALOG, CATALOG_COLUMNS, check_corrupt_fraction, inspect_images, validation_report
from xfer.io import atomic_dir, write_json
from xfer.procs import owned_tempdir, remove_orphaned_tempdirs

log = logging.getLogger(__name__)

REPORT = "validation.json"
# data/downloads/<prefix><host>-<pid>-<start>-<random>: a fetch's staging folder (xfer.procs.owned_tempdir).
STAGING_PREFIX = ".staging-"
SUMMARY = "dataset.json"


def fetch_dataset(cfg: DataConfig, raw_root: Path, downloads: Path, root: Path = Path("."), progress: bool = True, download_query: str | None = None) -> dict:
    """Materialise the dataset `cfg` names under raw_root/<name>; returns dataset.json's content.

    download_query: secret query parameters (``token=...``) for the URL in
    `cfg.dataset` (not for registry archives, whose hosts must not see them),
    appended to its requests only, never written.
    """
    source = resolve_source(cfg)
    check_source(source, root)
    raw_root, downloads = Path(raw_root), Path(downloads)
    dest = raw_root / source.name
    downloads.mkdir(parents=True, exist_ok=True)
    # A fetch killed mid-way (SIGKILL runs no cleanup) left its staging folder: the next one removes it.
    for orphan in remove_orphaned_tempdirs(downloads, STAGING_PREFIX):
        log.warning("removed %s, the staging folder of a fetch that was killed", orphan)
    # Staging beside the downloads (same filesystem: unpacked files are moved, not copied).
    with owned_tempdir(downloads, STAGING_PREFIX) as staging, atomic_dir(dest) as out:
        tree, owned = materialise(source, cfg, root, downloads, staging, progress, download_query)
        summary = normalise_and_validate(tree, source, cfg, out, move=owned, progress=progress)
        summary["source"] = source.describe()
        write_json(out / SUMMARY, summary)
    remove_other_datasets(raw_root, keep=source.name)
    return summary


def materialise(
    source: DatasetSource, cfg: DataConfig, root: Path, downloads: Path, staging: Path, progress: bool, download_query: str | None = None
) -> tuple[Path, bool]:
    """The unpacked dataset as a folder, and whether it is ours to move files out of."""
    if source.kind == "digits":
        from xfer.data.digits import write_digits

        write_digits(staging, cfg.digits.source_per_class, cfg.digits.target_per_class, seed=cfg.digits.seed, progress=progress)
        return staging, True
    if source.kind == "folder":
        return local_path(source.folder, root), False
    if source.kind == "torchvision":
        from xfer.data.torchvision_sets import export_torchvision

        export_torchvision(source, downloads, staging, progress=progress)
        return staging, True
    max_bytes = int(cfg.max_unpacked_gb * 1e9)
    tree = staging / "tree"
    tree.mkdir()
    for i, archive in enumerate(source.archives):
        # Only the user's own URL (not a registry entry's) gets the secret query.
        path = obtain_archive(archive, root, downloads, progress, download_query if source.entry is None else None)
        unpacked = extract_archive(path, staging / f"archive{i}", max_bytes=max_bytes, progress=progress)
        max_bytes -= tree_size(unpacked)
        merge_into(unpacked, tree)
    return tree, True


def obtain_archive(archive: Archive, root: Path, downloads: Path, progress: bool, query: str | None = None) -> Path:
    """A verified local copy of `archive`: downloaded (resumably) or the user's own file."""
    if not archive.is_url:
        path = local_path(archive.location, root)
        verify(path, archive)
        return path
    digest = archive.sha256 or archive.md5
    # Named by digest, so two datasets' `train.tar` never overwrite each other.
    dest = downloads / f"{digest[:16]}-{archive.filename}"
    if archive.sha256 is not None:
        return download(archive.location, dest, archive.sha256, progress=progress, query=query)
    # md5 only (the publisher gives nothing stronger): download under a name that
    # cannot be mistaken for a verified copy, check, then rename.
    if dest.is_file():
        return dest
    unverified = download(archive.location, dest.with_name(dest.name + ".unverified"), None, progress=progress, query=query)
    try:
        verify(unverified, archive)
    except ChecksumError:
        unverified.unlink()
        raise
    os.replace(unverified, dest)
    return dest


def verify(path: Path, archive: Archive) -> None:
    """Compare `path` with the archive's sha256 (or md5); ChecksumError names both digests."""
    for algorithm, expected in (("sha256", archive.sha256), ("md5", archive.md5)):
        if expected is None:
            continue
        actual = file_digest(path, algorithm)
        if actual != expected.lower():
            raise ChecksumError(f"{archive.location}: {algorithm} mismatch: expected {expected}, got {actual}")
        return


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tree_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def merge_into(unpacked: Path, tree: Path) -> None:
    """Move an archive's top-level entries into the common tree (several archives, one dataset)."""
    for child in sorted(unpacked.iterdir()):
        target = tree / child.name
        if target.exists():
            raise ValueError(f"two archives both hold a top-level {child.name!r}; give data.domains explicitly")
        os.replace(child, target)


def normalise_and_validate(tree: Path, source: DatasetSource, cfg: DataConfig, out: Path, move: bool, progress: bool) -> dict:
    """Place the images under out/<domain>/<class>/, write images.csv and validation.json."""
    domains = find_domains(tree, source.domains)
    listings = {domain: list_domain(folder, tree) for domain, folder in domains.items()}
    classes = check_classes(listings, cfg.classes.rename, cfg.classes.drop)
    plan = plan_images(listings, domains, classes, cfg.classes.rename)
    set_max_image_pixels(cfg.max_image_pixels)
    results = inspect_images([p.source for p in plan], progress=progress)

    good, rows, corrupt = [], [], defaultdict(list)
    for image, (digest, error) in zip(plan, results):
        if error is None:
            good.append(image)
            rows.append((image.path, image.domain, image.class_name, digest))
        else:
            corrupt[image.domain].append((shown(image.source, tree), error))
    catalog = pd.DataFrame(rows, columns=CATALOG_COLUMNS).sort_values("path", ignore_index=True)
    other = {d: [shown(f, tree) for f in lst.other_files] for d, lst in listings.items()}
    empty = {d: lst.empty_class_folders for d, lst in listings.items()}
    special = {d: [(shown(f, tree), kind) for f, kind in lst.special_files] for d, lst in listings.items()}
    report = validation_report(catalog, dict(corrupt), other, empty, special)
    check_corrupt_fraction(report, cfg.max_corrupt_fraction)

    place(good, out, move=move, progress=progress)
    catalog.to_csv(out / CATALOG, index=False)
    write_json(out / REPORT, report)
    return {
        "dataset": source.name,
        "classes": classes,
        "domains": {d: {"images": v["images"], "corrupt": v["corrupt"], "special_files": v["special_files"]} for d, v in report["domains"].items()},
    }


def shown(path: Path, tree: Path) -> str:
    """A path as the report names it: relative to the dataset as unpacked (bytes that are not UTF-8 escaped)."""
    return os.fsencode(Path(path).relative_to(tree).as_posix()).decode("utf-8", "backslashreplace")


def remove_other_datasets(raw_root: Path, keep: str) -> None:
    """data/raw holds the current dataset only, so its DVC hash is that dataset's.

    Archives stay in data/downloads, so switching back unpacks without downloading.
    """
    for child in Path(raw_root).iterdir():
        if child.name != keep:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
