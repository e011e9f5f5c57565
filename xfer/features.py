"""Frozen-backbone features for every manifest row, cached by content.

A cache entry lives in `<root>/<key>/` where key hashes what determines the
numbers: backbone name, weights digest, preprocessing and manifest digest.
The same inputs never get computed twice; an entry is written to a
temporary folder and renamed, so a half-written one never exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from xfer.backbones import Preprocessing
from xfer.data.images import ImageRows
from xfer.io import atomic_dir, sha256_json, write_json

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
CURRENT_FILE = "current.json"
INDEX_COLUMNS = ["path", "label", "domain", "role", "split", "sha256"]
# Bump when extraction changes in a way the key's inputs don't capture.
EXTRACTOR_VERSION = 1


class FeatureCacheError(ValueError):
    """A cache entry is missing or does not match what it claims."""


def manifest_digest(manifest: pd.DataFrame) -> str:
    cols = manifest[INDEX_COLUMNS].astype(str)
    return sha256_json(cols.values.tolist())


def cache_key(backbone_name: str, weights_digest: str, prep: Preprocessing, manifest: pd.DataFrame) -> str:
    return sha256_json(
        {
            "backbone": backbone_name,
            "weights": weights_digest,
            "preprocessing": prep.as_dict(),
            "manifest": manifest_digest(manifest),
            "extractor": EXTRACTOR_VERSION,
        }
    )[:16]


@dataclass(frozen=True)
class FeatureSet:
    features: np.ndarray  # (N, D) float32, row i <-> index row i
    index: pd.DataFrame
    meta: dict

    def select(self, role: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = ((self.index.role == role) & (self.index.split == split)).to_numpy()
        return self.features[mask], self.index.label.to_numpy()[mask]


@torch.inference_mode()
def extract(model: nn.Module, manifest: pd.DataFrame, prep: Preprocessing, batch_size: int, root: Path = Path("."), device: str = "cpu", progress: bool = True) -> np.ndarray:
    model = model.eval().to(device)
    data = ImageRows(manifest.path.tolist(), manifest.label.tolist(), prep, root)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for x, _ in tqdm(loader, desc="features", unit="batch", disable=not progress):
        out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def entry_dir(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / key


def is_complete(entry: Path) -> bool:
    return all((entry / f).is_file() for f in (FEATURES_FILE, INDEX_FILE, META_FILE))


def write_entry(cache_root: Path, key: str, features: np.ndarray, manifest: pd.DataFrame, meta: dict) -> Path:
    dest = entry_dir(cache_root, key)
    with atomic_dir(dest) as tmp:
        np.save(tmp / FEATURES_FILE, features)
        manifest[INDEX_COLUMNS].to_csv(tmp / INDEX_FILE, index=False)
        write_json(tmp / META_FILE, {**meta, "key": key, "rows": int(features.shape[0]), "dim": int(features.shape[1])})
    return dest


def set_current(cache_root: Path, key: str) -> None:
    """Point later stages at `key`: the entry the current params and manifest produce."""
    write_json(Path(cache_root) / CURRENT_FILE, {"key": key})


def load_entry(entry: Path) -> FeatureSet:
    if not is_complete(entry):
        raise FeatureCacheError(f"feature cache entry {entry} is missing or incomplete (run the features stage)")
    features = np.load(entry / FEATURES_FILE)
    index = pd.read_csv(entry / INDEX_FILE)
    meta = json.loads((entry / META_FILE).read_text())
    if features.shape[0] != len(index):
        raise FeatureCacheError(f"{entry}: {features.shape[0]} feature rows but {len(index)} index rows")
    return FeatureSet(features, index, meta)


def load_current(cache_root: Path) -> FeatureSet:
    pointer = Path(cache_root) / CURRENT_FILE
    if not pointer.is_file():
        raise FeatureCacheError(f"{pointer} not found (run the features stage)")
    key = json.loads(pointer.read_text())["key"]
    return load_entry(entry_dir(cache_root, key))
