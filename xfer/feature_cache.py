"""What the feature cache holds, and reclaiming the entries no output uses (`xfer cache list`, `xfer cache gc`).

The cache (Layout.feature_cache) keeps every key ever computed, so going back
to an earlier backbone finds its features; it only grows. An entry is in use
when the features stage's outputs (Layout.features_current, .features_members)
hold it; gc removes the others, and the shards a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from xfer import features as feats

# An old xfer cached entries in the features output folder itself, beside these.
_OUTPUT_NAMES = {"current", "members"}
# xfer.io.atomic_dir's temporary folders (`.<name>.<8 random>.tmp`, `.old`) and gc's
# own (`.gc`): left behind only by a process killed mid-write.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(tmp|old|gc)$")


@dataclass
class Entry:
    """One folder of the cache: a whole entry, or the shards of one being (or once) computed."""

    key: str
    path: Path
    kind: str  # "entry" or "shards"
    bytes: int  # apparent size of its files
    reclaimable: int  # bytes removing it frees: files with no other hard link (an output, DVC's cache)
    created: dt.datetime
    backbone: str = ""
    image_size: int | None = None
    rows: int | None = None
    dtype: str = ""
    used_by: list[str] = field(default_factory=list)
    problem: str | None = None  # set by list_entries(verify=True) when the files don't match their digests


def _files(folder: Path) -> list[os.stat_result]:
    return [p.stat() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def _sizes(folder: Path) -> tuple[int, int]:
    stats = _files(folder)
    return sum(s.st_size for s in stats), sum(s.st_size for s in stats if s.st_nlink == 1)


def references(outputs_current: Path, outputs_members: Path) -> dict[str, list[str]]:
    """{key: ["current" and/or "member <name>"]}: the entries the features stage's outputs hold now."""
    refs: dict[str, list[str]] = {}
    meta = Path(outputs_current) / feats.META_FILE
    if meta.is_file():
        refs.setdefault(_read_key(meta), []).append("current")
    members = Path(outputs_members) / feats.MEMBERS_FILE
    if members.is_file():
        try:
            keys = json.loads(members.read_text())
        except ValueError as err:
            raise feats.FeatureCacheError(f"{members} is not valid JSON ({err}): cannot tell which entries are in use; run the features stage") from None
        for name, key in sorted(keys.items()):
            refs.setdefault(key, []).append(f"member {name}")
    return refs


def _read_key(meta: Path) -> str:
    try:
        key = json.loads(meta.read_text()).get("key")
    except (ValueError, AttributeError) as err:
        raise feats.FeatureCacheError(f"{meta} is not readable ({err}): cannot tell which entry is in use; run the features stage") from None
    if not isinstance(key, str):
        raise feats.FeatureCacheError(f"{meta} names no key: cannot tell which entry is in use; run the features stage")
    return key


def list_entries(cache_root: Path, outputs_current: Path, outputs_members: Path, verify: bool = False) -> list[Entry]:
    """Every entry and shards folder of the cache, oldest first, with what uses it."""
    cache_root = Path(cache_root)
    refs = references(outputs_current, outputs_members)
    found = []
    for path in sorted(cache_root.iterdir()) if cache_root.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue  # lock files, and temporary folders of writes in progress
        size, own = _sizes(path)
        if path.name.endswith(feats.SHARDS_SUFFIX):
            key = path.name[: -len(feats.SHARDS_SUFFIX)]
            found.append(Entry(key, path, "shards", size, own, dt.datetime.fromtimestamp(path.stat().st_mtime)))
            continue
        meta_path = path / feats.META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        created = dt.datetime.fromtimestamp((meta_path if meta_path.is_file() else path).stat().st_mtime)
        entry = Entry(
            path.name,
            path,
            "entry",
            size,
            own,
            created,
            backbone=str(meta.get("backbone", "?")),
            image_size=(meta.get("preprocessing") or {}).get("image_size"),
            rows=meta.get("rows"),
            dtype=str(meta.get("dtype", "")),
            used_by=refs.get(path.name, []),
        )
        if verify:
            entry.problem = feats.entry_problem(path)
        elif not feats.is_complete(path):
            entry.problem = "incomplete"
        found.append(entry)
    return sorted(found, key=lambda e: (e.created, e.key))


def old_layout(features_dir: Path) -> list[Path]:
    """What an older xfer cached in the features output folder itself (`<key>/`, pointers, locks): nothing reads it now."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        return []
    return sorted(p for p in features_dir.iterdir() if p.name not in _OUTPUT_NAMES and not p.name.startswith("."))


@contextlib.contextmanager
def _free_key(cache_root: Path, key: str, dry_run: bool) -> Iterator[bool]:
    """True (holding the key's lock for the block) unless another process holds it.

    A dry run never creates a lock file: no file means no holder.
    """
    path = feats.lock_path(cache_root, key)
    try:
        fd = os.open(path, os.O_RDWR if dry_run else os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Rename out of the way, then delete: the folder is whole or gone, never half-deleted under its name."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".gc", dir=folder.parent))
    os.replace(folder, doomed / folder.name)
    shutil.rmtree(doomed)


@dataclass
class GcResult:
    removed: list[Entry]  # removed, or that a dry run would remove
    kept: list[Entry]  # in use by an output
    busy: list[Entry]  # another process holds the key's lock
    old_layout: list[Path]  # removed (or would be) from the features output folder
    leftovers: list[Path]  # temporary folders of writes a crash interrupted
    other_bytes: int  # what removing old_layout and leftovers frees

    @property
    def reclaimed(self) -> int:
        return sum(e.reclaimable for e in self.removed) + self.other_bytes


def gc(cache_root: Path, outputs_current: Path, outputs_members: Path, features_dir: Path | None = None, dry_run: bool = False) -> GcResult:
    """Remove every cache entry (and leftover shards) the outputs don't hold; with dry_run, only say which.

    Refuses while a features stage runs (it may be about to publish an entry no
    output holds yet) and when there is no current output to tell what is in
    use. An entry whose key another process has locked is skipped.
    """
    cache_root = Path(cache_root)
    if not (Path(outputs_current) / feats.META_FILE).is_file():
        raise feats.FeatureCacheError(
            f"{outputs_current} holds no features, so every entry would look unused: run the features stage first "
            f"(to drop the whole cache, delete {cache_root})"
        )
    # A dry run too: it says what gc would do, and gc refuses while a stage runs.
    with feats.cache_in_use(cache_root, exclusive=True) if cache_root.is_dir() else contextlib.nullcontext():
        entries = list_entries(cache_root, outputs_current, outputs_members)
        removed, kept, busy = [], [], []
        for entry in entries:
            if entry.used_by:
                kept.append(entry)
                continue
            with _free_key(cache_root, entry.key, dry_run) as free:
                if not free:
                    busy.append(entry)
                    continue
                if not dry_run:
                    _remove(entry.path)
                removed.append(entry)
        old = old_layout(features_dir) if features_dir is not None else []
        crashed = []
        # In the cache, a temporary folder belongs to a key: skip it while that key is locked (being written).
        for path in sorted(cache_root.iterdir()) if cache_root.is_dir() else []:
            match = _LEFTOVER.match(path.name)
            if match:
                with _free_key(cache_root, match["name"], dry_run=True) as free:
                    if free:
                        crashed.append(path)
        # Beside the outputs, only a features stage writes, and none runs while gc holds the cache.
        if features_dir is not None and Path(features_dir).is_dir():
            crashed += sorted(p for p in Path(features_dir).iterdir() if _LEFTOVER.match(p.name))
        other = sum(_own_bytes(p) for p in old + crashed)
        if not dry_run:
            for path in old + crashed:
                _remove(path) if path.is_dir() else path.unlink()
    return GcResult(removed, kept, busy, old, crashed, other)


def _own_bytes(path: Path) -> int:
    if path.is_dir():
        return _sizes(path)[1]
    stat = path.stat()
    return stat.st_size if stat.st_nlink == 1 else 0


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"
