"""ImageFolder domains -> one manifest with a stratified, seeded split.

The manifest is the contract every later stage reads. Columns:
path, label, class_name, domain, role (source/target), split, sha256.
Source rows are split train/val/test. Target rows are split
unlabeled/val/test: `unlabeled` rows may be used for adaptation without
their labels, and target `test` is never used for training or selection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xfer.config import SplitConfig
from xfer.data.images import IMAGE_SUFFIXES, check_image
from xfer.io import sha256_file

MANIFEST_COLUMNS = ["path", "label", "class_name", "domain", "role", "split", "sha256"]
SOURCE_SPLITS = ("train", "val", "test")
TARGET_SPLITS = ("unlabeled", "val", "test")


class SplitError(ValueError):
    """The raw data cannot be split as asked."""


def scan_domain(domain_dir: Path, root: Path) -> pd.DataFrame:
    """Every image under domain_dir/<class>/, with paths relative to `root`."""
    if not domain_dir.is_dir():
        raise SplitError(f"domain folder not found: {domain_dir}")
    rows = []
    for class_dir in sorted(p for p in domain_dir.iterdir() if p.is_dir()):
        for img in sorted(class_dir.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES and img.is_file():
                rows.append((img.relative_to(root).as_posix(), class_dir.name, img))
    if not rows:
        raise SplitError(f"no images found in {domain_dir} (expected <class>/<image> folders)")
    df = pd.DataFrame(rows, columns=["path", "class_name", "file"])
    return df


def _stratified_assign(labels: np.ndarray, names: tuple[str, str, str], fractions: tuple[float, float], seed: int) -> np.ndarray:
    """Per class: shuffle, then the first rows to names[2] (test), the next to names[1] (val)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    val_frac, test_frac = fractions
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n = len(idx)
        n_test = max(1, round(n * test_frac))
        n_val = max(1, round(n * val_frac))
        if n - n_test - n_val < 1:
            raise SplitError(f"class {label!r} has {n} images: too few for train, val and test")
        out[idx[:n_test]] = names[2]
        out[idx[n_test : n_test + n_val]] = names[1]
        out[idx[n_test + n_val :]] = names[0]
    return out


def build_manifest(raw_root: Path, source: str, target: str, cfg: SplitConfig, seed: int, root: Path = Path(".")) -> pd.DataFrame:
    """The manifest for raw_root/<source> and raw_root/<target>; every image is decoded once."""
    src = scan_domain(raw_root / source, root)
    tgt = scan_domain(raw_root / target, root)
    class_names = sorted(set(src.class_name))
    unknown = sorted(set(tgt.class_name) - set(class_names))
    if unknown:
        raise SplitError(f"target domain {target!r} has classes the source lacks: {unknown}")
    label_of = {name: i for i, name in enumerate(class_names)}

    parts = []
    for df, domain, role, names, fracs, salt in (
        (src, source, "source", SOURCE_SPLITS, (cfg.source_val, cfg.source_test), 0),
        (tgt, target, "target", TARGET_SPLITS, (cfg.target_val, cfg.target_test), 1),
    ):
        df = df.copy()
        df["label"] = df.class_name.map(label_of).astype(int)
        df["domain"] = domain
        df["role"] = role
        # Different seeds per domain so equal-sized domains don't get mirrored splits.
        df["split"] = _stratified_assign(df.label.to_numpy(), names, fracs, seed * 2 + salt)
        parts.append(df)
    manifest = pd.concat(parts, ignore_index=True)
    for f in manifest.file:
        check_image(f)
    manifest["sha256"] = [sha256_file(f) for f in manifest.file]
    return manifest[MANIFEST_COLUMNS]


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"manifest not found: {path} (run the split stage first)")
    df = pd.read_csv(path, dtype={"class_name": str, "sha256": str})
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise SplitError(f"manifest {path} lacks columns {missing}")
    return df


def class_names(manifest: pd.DataFrame) -> list[str]:
    pairs = manifest[["label", "class_name"]].drop_duplicates().sort_values("label")
    return pairs.class_name.tolist()


def rows(manifest: pd.DataFrame, role: str, split: str) -> pd.DataFrame:
    return manifest[(manifest.role == role) & (manifest.split == split)]
