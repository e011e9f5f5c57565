"""Frozen-backbone features for every manifest row, cached by content.

A cache entry lives in `<root>/<key>/` where key hashes what determines the
numbers: backbone name, weights digest, preprocessing, manifest digest and
the stored dtype. The same inputs never get computed twice: `get_or_compute`
serialises processes that want the same key on a file lock, and an entry is
written to a temporary folder and renamed, so a half-written one never exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from xfer.data.images import Preprocessing
from xfer.data.images import ImageRows
from xfer.io import atomic_dir, save_with, sha256_json, write_json

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
CURRENT_FILE = "current.json"
# {fusion member name: key}: the extra backbones of params `fusion.backbones`.
MEMBERS_FILE = "members.json"
LOCK_SUFFIX = ".lock"
# `<key>.shards/`: the shards of an entry being computed, kept across a crash so a
# rerun computes only the missing ones; removed once the entry is written.
SHARDS_SUFFIX = ".shards"
INDEX_COLUMNS = ["path", "label", "domain", "role", "split", "sha256"]
# What an entry may store; mirrors FeaturesConfig.dtype.
DTYPES = ("float32", "float16")
# Bump when extraction changes in a way the key's inputs don't capture.
# 2: every shard computes with one intra-op thread (`one_intra_op_thread`).
EXTRACTOR_VERSION = 2

log = logging.getLogger(__name__)


class FeatureCacheError(ValueError):
    """A cache entry is missing or does not match what it claims."""


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise FeatureCacheError(f"features dtype {dtype!r} is not supported; choose from {', '.join(DTYPES)}")
    return np.dtype(dtype)


def manifest_digest(manifest: pd.DataFrame) -> str:
    cols = manifest[INDEX_COLUMNS].astype(str)
    return sha256_json(cols.values.tolist())


def cache_key(backbone_name: str, weights_digest: str, prep: Preprocessing, manifest: pd.DataFrame, dtype: str = "float32") -> str:
    _check_dtype(dtype)
    return sha256_json(
        {
            "backbone": backbone_name,
            "weights": weights_digest,
            "preprocessing": prep.as_dict(),
            "manifest": manifest_digest(manifest),
            "extractor": EXTRACTOR_VERSION,
            # float16 and float32 entries hold different numbers: never let one stand in for the other.
            "dtype": dtype,
        }
    )[:16]


@dataclass(frozen=True)
class FeatureSet:
    # (N, D) float32 or float16, usually a read-only np.memmap; row i <-> index row i.
    features: np.ndarray
    index: pd.DataFrame
    meta: dict

    def select(self, role: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The rows of one (role, split), read into memory as float32 whatever the stored dtype."""
        mask = ((self.index.role == role) & (self.index.split == split)).to_numpy()
        return np.asarray(self.features[mask], dtype=np.float32), self.index.label.to_numpy()[mask]


def worker_context() -> multiprocessing.context.BaseContext:
    """Start loader workers from a fork server, never by forking the caller.

    The caller is usually a Prefect flow run: a multi-threaded process whose
    libraries register thread-exit hooks for their background threads. A
    forked worker inherits the hooks but not the threads; Prefect 3.8's log
    service hook then fails an assertion as the worker exits, the worker exits
    with code 1, and torch aborts the extraction ("DataLoader worker exited
    unexpectedly"): 3 extractions in 15 here. A fork server is a fresh
    single-threaded process; workers forked from it start clean.

    Each worker re-imports the caller's main module (`python -m flows.stages`
    pulls in Prefect and MLflow, ~5 s here), so the server imports it once,
    with this module, and the workers forked from it find both loaded.
    """
    preload = [__name__]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # `python -m pkg` runs pkg.__main__, which multiprocessing never re-imports
    # (importing it would run the program again), so neither do we.
    if main_spec is not None and main_spec.name != "__main__" and not main_spec.name.endswith(".__main__"):
        preload.append(main_spec.name)
    ctx = multiprocessing.get_context("forkserver")
    # Read when the server starts, at the first use in this process; later calls change nothing.
    ctx.set_forkserver_preload(preload)
    return ctx


def feature_loader(data: Dataset, batch_size: int, device: str = "cpu", num_workers: int = 0) -> DataLoader:
    """The DataLoader `extract` reads through, in manifest order."""
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        # One pass over the data: workers kept alive would only hold memory after it.
        persistent_workers=False,
        # Page-locked batches only help a host-to-GPU copy; on the CPU they cost a copy.
        pin_memory=torch.device(device).type == "cuda",
    )


@torch.inference_mode()
def extract(
    model: nn.Module,
    manifest: pd.DataFrame,
    prep: Preprocessing,
    batch_size: int,
    root: Path = Path("."),
    device: str = "cpu",
    progress: bool = True,
    num_workers: int = 0,
) -> np.ndarray:
    """(N, D) float32 features of every manifest row, in manifest order."""
    model = model.eval().to(device)
    data = ImageRows(manifest.path.tolist(), manifest.label.tolist(), prep, root)
    out = []
    for x, _ in tqdm(feature_loader(data, batch_size, device, num_workers), desc="features", unit="batch", disable=not progress):
        out.append(model(x.to(device, non_blocking=True)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def entry_dir(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / key


def is_complete(entry: Path) -> bool:
    return all((entry / f).is_file() for f in (FEATURES_FILE, INDEX_FILE, META_FILE))


def _as_stored(features: np.ndarray, dtype: str) -> np.ndarray:
    target = _check_dtype(dtype)
    with np.errstate(over="ignore"):  # an overflow is reported below, with what to do
        stored = np.asarray(features).astype(target, copy=False)
    if stored.ndim != 2:
        raise FeatureCacheError(f"features must be a (rows, dim) array, got shape {stored.shape}")
    # float16 tops out at 65504: a silent inf would poison every head trained on the entry.
    if not np.isfinite(stored).all():
        if not np.isfinite(np.asarray(features)).all():
            raise FeatureCacheError("the backbone produced non-finite features (NaN or inf); refusing to cache them")
        raise FeatureCacheError(
            f"features reach {float(np.abs(features).max()):.4g}, beyond the {dtype} range; store them as float32 (features.dtype)"
        )
    return stored


def write_entry(cache_root: Path, key: str, features: np.ndarray, manifest: pd.DataFrame, meta: dict, dtype: str = "float32") -> Path:
    stored = _as_stored(features, dtype)
    if stored.shape[0] != len(manifest):
        raise FeatureCacheError(f"{stored.shape[0]} feature rows for {len(manifest)} manifest rows")
    dest = entry_dir(cache_root, key)
    with atomic_dir(dest) as tmp:
        np.save(tmp / FEATURES_FILE, stored)
        manifest[INDEX_COLUMNS].to_csv(tmp / INDEX_FILE, index=False)
        write_json(tmp / META_FILE, {**meta, "key": key, "rows": int(stored.shape[0]), "dim": int(stored.shape[1]), "dtype": dtype})
    return dest


def lock_path(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / f"{key}{LOCK_SUFFIX}"


@contextlib.contextmanager
def key_lock(cache_root: Path, key: str) -> Iterator[None]:
    """Hold an exclusive flock on `<cache_root>/<key>.lock` for the block.

    The kernel drops the lock when the holder exits or dies, so a crashed
    computation never leaves the key locked. The file itself stays: removing
    it would let a waiter lock the old inode while a newcomer locks a new one.
    """
    path = lock_path(cache_root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("features %s: another process is computing them; waiting for it", key)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)


def get_or_compute(
    cache_root: Path,
    key: str,
    compute: Callable[[], np.ndarray],
    manifest: pd.DataFrame,
    meta: dict,
    dtype: str = "float32",
) -> tuple[Path, bool]:
    """The entry for `key`, computing it with `compute()` only if no process has.

    Returns (entry folder, cache hit). On a hit `compute` is never called.
    Processes asking for the same key at once queue on the key's lock: the
    first computes and writes, the others then find the entry complete.
    """
    _check_dtype(dtype)
    entry = entry_dir(cache_root, key)
    # Entries only appear by rename, so a complete one is whole: no lock needed to read it.
    if is_complete(entry):
        return entry, True
    with key_lock(cache_root, key):
        if is_complete(entry):
            return entry, True
        features = compute()
        write_entry(cache_root, key, features, manifest, meta, dtype)
    return entry, False


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch computes with a single intra-op thread inside the block.

    CPU kernels split some reductions by thread count, so the same batch gives
    features that differ in the last bits with 1 thread or 2. Shards run on
    threads of this process or on single-threaded Dask and Ray workers; with
    one intra-op thread each, every runner gives the same bytes, and the
    parallelism comes from running shards side by side.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shard_bounds(rows: int, shard_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of `shard_rows` rows each (the last may be shorter).

    Shards hold whole batches, so extracting them one by one feeds the backbone
    exactly the batches of one pass over all rows.
    """
    if shard_rows < 1 or shard_rows % batch_size:
        raise FeatureCacheError(f"shard_rows {shard_rows} must be a positive multiple of batch_size {batch_size}")
    return [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]


def shards_dir(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / f"{key}{SHARDS_SUFFIX}"


def shard_path(shards: Path, start: int, stop: int) -> Path:
    return Path(shards) / f"rows-{start:010d}-{stop:010d}.npy"


def write_shard(path: Path, features: np.ndarray, rows: int) -> Path:
    """Write one shard's float32 features atomically: a shard file is whole or absent."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != rows:
        raise FeatureCacheError(f"shard {Path(path).name}: features of shape {features.shape} for {rows} rows")

    def save(tmp: Path) -> None:
        # Through a file object: np.save given a path would append ".npy" to the temporary name.
        with open(tmp, "wb") as f:
            np.save(f, features, allow_pickle=False)

    return save_with(path, save)


def read_shard(path: Path, rows: int) -> np.ndarray | None:
    """A finished shard's features, or None if it is missing or not what it should be."""
    try:
        features = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if features.ndim != 2 or features.shape[0] != rows or features.dtype != np.float32:
        return None
    return features


def merge_shards(shards: Path, bounds: list[tuple[int, int]]) -> np.ndarray:
    """The shards' features in row order, as one (rows, dim) array."""
    parts = []
    for start, stop in bounds:
        part = read_shard(shard_path(shards, start, stop), stop - start)
        if part is None:
            raise FeatureCacheError(f"shard {shard_path(shards, start, stop)} is missing or damaged; rerun the features stage")
        parts.append(part)
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise FeatureCacheError(f"shards in {shards} disagree on the feature dimension: {sorted(dims)}")
    return np.concatenate(parts)


def set_current(cache_root: Path, key: str) -> None:
    """Point later stages at `key`: the entry the current params and manifest produce."""
    write_json(Path(cache_root) / CURRENT_FILE, {"key": key})


def load_entry(entry: Path) -> FeatureSet:
    """The entry's features memory-mapped (read-only, pages read on use), with its index and meta."""
    if not is_complete(entry):
        raise FeatureCacheError(f"feature cache entry {entry} is missing or incomplete (run the features stage)")
    try:
        features = np.load(entry / FEATURES_FILE, mmap_mode="r")
    except ValueError as err:
        raise FeatureCacheError(f"{entry / FEATURES_FILE}: not a readable .npy array: {err}") from None
    index = pd.read_csv(entry / INDEX_FILE)
    meta = json.loads((entry / META_FILE).read_text())
    if features.ndim != 2:
        raise FeatureCacheError(f"{entry}: features have shape {features.shape}, expected (rows, dim)")
    if features.shape[0] != len(index):
        raise FeatureCacheError(f"{entry}: {features.shape[0]} feature rows but {len(index)} index rows")
    return FeatureSet(features, index, meta)


def set_members(cache_root: Path, keys: dict[str, str]) -> None:
    """Point later stages at the fusion backbones' entries: {member name: key}."""
    write_json(Path(cache_root) / MEMBERS_FILE, keys)


def load_member(cache_root: Path, name: str) -> FeatureSet:
    """The features of fusion member `name` (xfer.config.member_name), as the features stage left them."""
    pointer = Path(cache_root) / MEMBERS_FILE
    keys = json.loads(pointer.read_text()) if pointer.is_file() else {}
    if name not in keys:
        raise FeatureCacheError(f"no cached features for fusion member {name} in {pointer} (run the features stage)")
    return load_entry(entry_dir(cache_root, keys[name]))


def load_current(cache_root: Path) -> FeatureSet:
    pointer = Path(cache_root) / CURRENT_FILE
    if not pointer.is_file():
        raise FeatureCacheError(f"{pointer} not found (run the features stage)")
    key = json.loads(pointer.read_text())["key"]
    return load_entry(entry_dir(cache_root, key))
