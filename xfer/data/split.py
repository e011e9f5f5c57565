"""ImageFolder domains -> one manifest with a stratified, seeded split.

The manifest is the contract every later stage reads. Columns:
path, label, class_name, domain, role (source/target), split, sha256.
Source rows are split train/val/test. Target rows are split
train/unlabeled/val/test: `train` is the labelled target budget
(semi-supervised; empty by default), `unlabeled` rows may be used for
adaptation without their labels, and target `test` is never used for
training or selection, not even as a content duplicate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xfer.config import DataConfig, SplitConfig
from xfer.data.validate import read_catalog

MANIFEST_COLUMNS = ["path", "label", "class_name", "domain", "role", "split", "sha256"]
SOURCE_SPLITS = ("train", "val", "test")
TARGET_SPLITS = ("train", "unlabeled", "val", "test")


class SplitError(ValueError):
    """The raw data cannot be split as asked."""


# Where a content duplicate may stay: the first group listed keeps it, later ones drop it.
# Target test comes last, so no test image is ever also seen in training or selection.
SPLIT_PRECEDENCE = [
    ("source", "train"),
    ("target", "train"),
    ("target", "unlabeled"),
    ("source", "val"),
    ("target", "val"),
    ("source", "test"),
    ("target", "test"),
]


def _domain_rng(seed: int, role: str, position: int) -> np.random.Generator:
    """One generator per domain, so equal-sized domains don't get mirrored splits."""
    salt = {"source": 0, "target": 1}[role]
    if position == 0:
        return np.random.default_rng(seed * 2 + salt)
    return np.random.default_rng([seed, salt, position])


def _count(n: int, fraction: float) -> int:
    return max(1, round(n * fraction)) if fraction > 0 else 0


def assign_splits(labels: np.ndarray, role: str, cfg: SplitConfig, rng: np.random.Generator, domain: str, class_names: list[str]) -> np.ndarray:
    """Per class: shuffle, then test, then val, then (target) the labelled budget; the rest trains."""
    out = np.empty(len(labels), dtype=object)
    val_frac, test_frac = (cfg.source_val, cfg.source_test) if role == "source" else (cfg.target_val, cfg.target_test)
    rest_name = "train" if role == "source" else "unlabeled"
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n = len(idx)
        n_test, n_val = _count(n, test_frac), _count(n, val_frac)
        n_labeled = 0
        if role == "target":
            n_labeled = cfg.target_shots if cfg.target_shots is not None else _count(n, cfg.target_labeled)
        left = n - n_test - n_val - n_labeled
        if role == "source" and left < 1 or left < 0:
            need = n_test + n_val + n_labeled + (role == "source")
            raise SplitError(
                f"class {class_names[label]!r} of {role} domain {domain!r} has {n} images, too few for "
                f"{n_test} test + {n_val} val" + (f" + {n_labeled} labelled" if n_labeled else "") + f" (+ train): needs {need}"
            )
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
        out[idx[n_test + n_val : n_test + n_val + n_labeled]] = "train"
        out[idx[n_test + n_val + n_labeled :]] = rest_name
    return out


def drop_duplicates(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Keep each image content once: within a domain the first path, across splits by SPLIT_PRECEDENCE."""
    # Vectorised (no per-row Python): DomainNet-sized manifests have 600k rows.
    rank = {f"{role}/{split}": i for i, (role, split) in enumerate(SPLIT_PRECEDENCE)}
    order = (manifest.role + "/" + manifest.split).map(rank)
    ranked = manifest.assign(_rank=order).sort_values(["_rank", "path"], kind="stable")
    keep = ~ranked.duplicated("sha256", keep="first")
    dropped = ranked[~keep]
    report = {
        "dropped": int(len(dropped)),
        "dropped_by_split": {f"{r}/{s}": int(n) for (r, s), n in dropped.groupby(["role", "split"]).size().items()},
        "examples": dropped.path.head(20).tolist(),
    }
    return manifest[manifest.index.isin(ranked.index[keep])], report


def build_manifest(dataset_dir: Path, cfg: DataConfig, seed: int, root: Path = Path(".")) -> tuple[pd.DataFrame, dict]:
    """The manifest for the configured source domain(s) and target domain, and its split report.

    Reads the fetch stage's catalog (images.csv): images were decoded and hashed there.
    """
    dataset_dir = Path(dataset_dir)
    catalog = read_catalog(dataset_dir)
    known = sorted(catalog.domain.unique())
    missing = [d for d in cfg.domain_names if d not in known]
    if missing:
        raise SplitError(f"domain(s) {missing} not in {dataset_dir.name!r}; its domains are {known} (data.source_domain / data.target_domain)")
    names = sorted(catalog.class_name.unique())
    label_of = {name: i for i, name in enumerate(names)}
    prefix = dataset_dir.relative_to(root).as_posix() if dataset_dir.is_relative_to(root) else dataset_dir.as_posix()

    parts = []
    roles = [(d, "source", i) for i, d in enumerate(cfg.source_domains)] + [(cfg.target_domain, "target", 0)]
    for domain, role, position in roles:
        df = catalog[catalog.domain == domain].sort_values("path", ignore_index=True)
        lacking = sorted(set(names) - set(df.class_name))
        if lacking:
            raise SplitError(f"{role} domain {domain!r} has no images of classes {lacking}: refetch with data.classes.drop")
        df = df.assign(label=df.class_name.map(label_of).astype(int), role=role, path=prefix + "/" + df.path)
        df["split"] = assign_splits(df.label.to_numpy(), role, cfg.split, _domain_rng(seed, role, position), domain, names)
        parts.append(df)
    manifest = pd.concat(parts, ignore_index=True)
    manifest, duplicates = drop_duplicates(manifest)
    manifest = manifest[MANIFEST_COLUMNS].reset_index(drop=True)
    return manifest, split_report(manifest, duplicates, cfg)


def split_report(manifest: pd.DataFrame, duplicates: dict, cfg: DataConfig) -> dict:
    counts = manifest.groupby(["domain", "role", "split", "class_name"]).size()
    per_split: dict = {}
    for (domain, role, split, name), n in counts.items():
        per_split.setdefault(f"{role}/{split}", {}).setdefault(domain, {})[name] = int(n)
    return {
        "source_domains": list(cfg.source_domains),
        "target_domain": cfg.target_domain,
        "target_labeled": {"fraction": cfg.split.target_labeled, "shots": cfg.split.target_shots},
        "rows": {k: sum(sum(c.values()) for c in v.values()) for k, v in per_split.items()},
        "per_class": per_split,
        "duplicates_removed": duplicates,
    }


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
