"""Frozen-backbone features for every manifest row, cached by content.

A cache entry lives in `<cache root>/<key>/` where key hashes what determines
the numbers: backbone name, weights digest, preprocessing, manifest digest and
the stored dtype. The same inputs never get computed twice: `get_or_compute`
serialises processes that want the same key on a file lock, and an entry is
written to a temporary folder and renamed, so a half-written one never exists.
Its meta.json records the sha256 of its features and index, so a damaged
entry is refused, never read.

The cache root (Layout.feature_cache) is not a DVC output: it keeps every key
ever computed, and DVC would hash them all. The features stage publishes the
entries the current params name as its outputs (`publish_current`,
`publish_members`), and later stages read only those (`load_current`,
`load_member`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
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

from xfer.data.images import ImageRows, Preprocessing
from xfer.io import atomic_dir, link_or_copy, naming_no_space, remove_leftovers, save_with, sha256_file, sha256_json, write_json

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
ENTRY_FILES = (FEATURES_FILE, INDEX_FILE, META_FILE)
# meta.json's {file: sha256} of the files it describes: checked on every load.
DIGESTS = "sha256"
DIGESTED_FILES = (FEATURES_FILE, INDEX_FILE)
# In the members output: {fusion member name: key}, one folder per member beside it.
MEMBERS_FILE = "members.json"
LOCK_SUFFIX = ".lock"
# `<cache root>/.in-use.lock`: held shared by every features stage for its whole run and
# exclusively by `xfer cache gc`, so gc never removes an entry a stage is about to publish.
IN_USE_LOCK = ".in-use.lock"
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


@dataclass(frozen=True)
class Compute:
    """Where the backbone runs and in what precision: both change the features' numbers."""

    device: str = "cpu"  # "cpu" or "cuda"
    half: bool = False  # float16 autocast (CUDA only)

    @property
    def tag(self) -> str:
        return f"{self.device}-float16" if self.half else self.device


CPU = Compute()


def compute_for(setting: str, half: bool, cuda_available: bool | None = None) -> Compute:
    """What `features.device` and `features.half` mean on this machine; checked before any work."""
    if setting not in ("auto", "cpu", "cuda"):
        raise FeatureCacheError(f"features.device: {setting!r} is not one of auto, cpu, cuda")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if setting == "cuda" and not has_cuda:
        raise FeatureCacheError("features.device: 'cuda' was asked for but no CUDA device is available here; use 'auto' or 'cpu'")
    device = "cuda" if setting == "cuda" or (setting == "auto" and has_cuda) else "cpu"
    return Compute(device, half and device == "cuda")


def check_params(params, root: Path) -> None:
    """features.device names a device this machine has."""
    compute_for(params.features.device, params.features.half)


def entry_meta(backbone_name: str, weights_digest: str, prep: Preprocessing, compute: Compute = CPU) -> dict:
    """What an entry's meta.json records of how it was made (write_entry adds the key, rows and digests)."""
    meta = {"backbone": backbone_name, "weights_digest": weights_digest, "preprocessing": prep.as_dict()}
    if compute != CPU:  # a CPU entry's meta.json stays as it always was
        meta["compute"] = f"{compute.tag} ({torch.cuda.get_device_name()})"
    return meta


def cache_key(backbone_name: str, weights_digest: str, prep: Preprocessing, manifest: pd.DataFrame, dtype: str = "float32", compute: Compute = CPU) -> str:
    _check_dtype(dtype)
    inputs = {
        "backbone": backbone_name,
        "weights": weights_digest,
        "preprocessing": prep.as_dict(),
        "manifest": manifest_digest(manifest),
        "extractor": EXTRACTOR_VERSION,
        # float16 and float32 entries hold different numbers: never let one stand in for the other.
        "dtype": dtype,
    }
    if compute != CPU:
        # GPU kernels (and float16) give other numbers than the CPU. Only named when not
        # the CPU, so every CPU entry keeps the key it had before devices were a choice.
        inputs["compute"] = compute.tag
    return sha256_json(inputs)[:16]


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
    half: bool = False,
) -> np.ndarray:
    """(N, D) float32 features of every manifest row, in manifest order (`half`: computed in float16 on CUDA)."""
    if half and torch.device(device).type != "cuda":
        raise FeatureCacheError(f"half-precision features run on CUDA only, not on {device!r}")
    model = model.eval().to(device)
    data = ImageRows(manifest.path.tolist(), manifest.label.tolist(), prep, root)
    out = []
    with torch.autocast("cuda", dtype=torch.float16, enabled=half):
        for x, _ in tqdm(feature_loader(data, batch_size, device, num_workers), desc="features", unit="batch", disable=not progress):
            out.append(model(x.to(device, non_blocking=True)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def entry_dir(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / key


def is_complete(entry: Path) -> bool:
    return all((Path(entry) / f).is_file() for f in ENTRY_FILES)


def entry_problem(entry: Path) -> str | None:
    """Why the entry (or a published copy of one) cannot be trusted, or None if every file is what meta.json records.

    Reads the features and index once to hash them (about 1 GB/s): the price of never
    training on a file that was truncated, overwritten in place or flipped on disk.
    """
    entry = Path(entry)
    missing = [f for f in ENTRY_FILES if not (entry / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        meta = json.loads((entry / META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{META_FILE} is not valid JSON ({err})"
    digests = meta.get(DIGESTS) if isinstance(meta, dict) else None
    if not isinstance(digests, dict):
        return f"{META_FILE} records no file digests (written by an older xfer)"
    for name in DIGESTED_FILES:
        got = sha256_file(entry / name)
        if got != digests.get(name):
            return f"{name} has sha256 {got[:12]}, but {META_FILE} records {str(digests.get(name))[:12]}"
    return None


def verify_entry(entry: Path, hint: str = "run the features stage again") -> None:
    problem = entry_problem(entry)
    if problem is not None:
        raise FeatureCacheError(f"features in {entry} are damaged or incomplete: {problem}; {hint}")


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
        raise FeatureCacheError(f"features reach {float(np.abs(features).max()):.4g}, beyond the {dtype} range; store them as float32 (features.dtype)")
    return stored


def write_entry(cache_root: Path, key: str, features: np.ndarray, manifest: pd.DataFrame, meta: dict, dtype: str = "float32") -> Path:
    stored = _as_stored(features, dtype)
    if stored.shape[0] != len(manifest):
        raise FeatureCacheError(f"{stored.shape[0]} feature rows for {len(manifest)} manifest rows")
    dest = entry_dir(cache_root, key)
    with atomic_dir(dest) as tmp:
        with naming_no_space(dest / FEATURES_FILE, tmp / FEATURES_FILE, npy_bytes(stored)):
            np.save(tmp / FEATURES_FILE, stored)
        with naming_no_space(dest / INDEX_FILE, tmp / INDEX_FILE):
            manifest[INDEX_COLUMNS].to_csv(tmp / INDEX_FILE, index=False)
        digests = {name: sha256_file(tmp / name) for name in DIGESTED_FILES}
        write_json(tmp / META_FILE, {**meta, "key": key, "rows": int(stored.shape[0]), "dim": int(stored.shape[1]), "dtype": dtype, DIGESTS: digests})
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
    An entry whose files do not match their recorded digests is computed
    again and replaced, with a warning: it is never returned as a hit.
    """
    _check_dtype(dtype)
    entry = entry_dir(cache_root, key)
    # Entries only appear by rename, so a complete one is whole: no lock needed to read it.
    if is_complete(entry) and entry_problem(entry) is None:
        return entry, True
    with key_lock(cache_root, key):
        # What a write of this key killed mid-way left beside the entry; the lock says no one writes it now.
        for leftover in remove_leftovers([entry]):
            log.warning("features %s: removed %s, left by a write that was killed", key, leftover)
        if entry.exists():
            problem = entry_problem(entry)
            if problem is None:
                return entry, True
            log.warning("features %s: the cache entry %s is damaged (%s); computing it again", key, entry, problem)
        features = compute()
        write_entry(cache_root, key, features, manifest, meta, dtype)
    return entry, False


@contextlib.contextmanager
def cache_in_use(cache_root: Path, exclusive: bool = False) -> Iterator[None]:
    """Hold the cache's in-use lock: shared for a stage that reads and publishes entries, exclusive for gc.

    Exclusive never waits: it raises FeatureCacheError while any stage holds the lock.
    """
    path = Path(cache_root) / IN_USE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if exclusive:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FeatureCacheError(f"a features stage is using the feature cache {cache_root} right now; try again when it has finished") from None
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


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

    return save_with(path, save, size=npy_bytes(features))


def npy_bytes(array: np.ndarray) -> int:
    """The size of `array` as a .npy file: its header, then its data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.tell() + array.nbytes


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


def load_entry(entry: Path, verify: bool = True) -> FeatureSet:
    """The entry's features memory-mapped (read-only, pages read on use), with its index and meta.

    With `verify` (the default) each file is first checked against the digest meta.json
    records: one read of the features, which also brings them into the page cache.
    """
    entry = Path(entry)
    if not is_complete(entry):
        raise FeatureCacheError(f"features {entry} are missing or incomplete (run the features stage)")
    if verify:
        verify_entry(entry)
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


def _place_entry(entry: Path, dest: Path) -> bool:
    dest.mkdir(parents=True, exist_ok=True)
    linked = [link_or_copy(entry / name, dest / name) for name in ENTRY_FILES]
    return all(linked)


# Why the stage's outputs are copies of entries and not a pointer file naming a key:
# DVC hashes, pushes and pulls what a stage declares. A pointer would keep the features
# themselves out of `dvc push`, so a teammate's `dvc pull` would get a name without the
# numbers and head would fail on a clone; and `dvc status` could not see a damaged entry.
# Published files are hard links into the cache, so on one filesystem this costs no
# space or copying; elsewhere they are copies. A hard link shares its bytes with the
# entry: the digests in meta.json catch a file changed in place, on either side.
def publish_current(entry: Path, dest: Path) -> bool:
    """Make `dest` (the features stage's current output) the entry's files, swapped in whole; True if hard-linked.

    The entry is verified against its digests first: a damaged one is never published.
    """
    verify_entry(entry)
    with atomic_dir(dest) as tmp:
        return _place_entry(Path(entry), tmp)


def publish_members(entries: dict[str, Path], dest: Path) -> bool:
    """Make `dest` the fusion members' output: `<name>/` per member (the entry's files) and members.json {name: key}.

    Always written, with members.json `{}` when there are none, so the output exists
    for DVC; swapped in whole, so a dropped member disappears with the old folder.
    """
    linked = True
    with atomic_dir(dest) as tmp:
        keys = {}
        for name, entry in entries.items():
            if not name or name in {MEMBERS_FILE, ".", ".."} or "/" in name or name.startswith("."):
                raise FeatureCacheError(f"fusion member name {name!r} cannot name a folder")
            verify_entry(entry)
            linked &= _place_entry(Path(entry), tmp / name)
            keys[name] = json.loads((Path(entry) / META_FILE).read_text())["key"]
        write_json(tmp / MEMBERS_FILE, keys)
    return linked


def member_dirs(members: Path) -> list[Path]:
    """The member folders of a members output (none if it doesn't exist)."""
    members = Path(members)
    return sorted(p for p in members.iterdir() if p.is_dir() and not p.name.startswith(".")) if members.is_dir() else []


def find_published(key: str, folders: list[Path]) -> Path | None:
    """The first of `folders` (published outputs) that holds entry `key` whole and undamaged, if any."""
    for folder in folders:
        try:
            meta = json.loads((Path(folder) / META_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("key") == key and entry_problem(folder) is None:
            return Path(folder)
    return None


def load_member(members: Path, name: str) -> FeatureSet:
    """The features of fusion member `name` (xfer.config.member_name), from the members output the features stage wrote."""
    pointer = Path(members) / MEMBERS_FILE
    if not pointer.is_file():
        raise FeatureCacheError(f"{pointer} not found (run the features stage)")
    keys = json.loads(pointer.read_text())
    if name not in keys:
        have = ", ".join(sorted(keys)) or "none"
        raise FeatureCacheError(f"no features for fusion member {name} in {members} (it has: {have}); run the features stage")
    fs = load_entry(Path(members) / name)
    if fs.meta.get("key") != keys[name]:
        raise FeatureCacheError(
            f"{Path(members) / name} holds the features of key {fs.meta.get('key')}, but {pointer} names {keys[name]}; run the features stage"
        )
    return fs


def concatenate(sets: list[FeatureSet]) -> FeatureSet:
    """Several backbones' features of the same rows side by side (float32), keyed by all their keys."""
    first = sets[0]
    for other in sets[1:]:
        if not first.index["path"].equals(other.index["path"]):
            raise FeatureCacheError(f"features of {other.meta.get('backbone')} are not in the rows of {first.meta.get('backbone')}: run the features stage")
    features = np.concatenate([np.asarray(s.features, dtype=np.float32) for s in sets], axis=1)
    meta = {
        **first.meta,
        "key": "+".join(s.meta["key"] for s in sets),
        "backbone": "+".join(s.meta.get("backbone", "?") for s in sets),
        "dim": features.shape[1],
    }
    return FeatureSet(features, first.index, meta)


def load_fused(main: FeatureSet, members: Path, names: list[str]) -> FeatureSet:
    """`main` side by side with the fusion members `names` (fusion.mode features)."""
    return concatenate([main, *(load_member(members, name) for name in names)])


def load_current(current: Path) -> FeatureSet:
    """The main backbone's features, from the current output the features stage wrote."""
    if not Path(current).is_dir():
        raise FeatureCacheError(f"{current} not found (run the features stage)")
    return load_entry(Path(current))
