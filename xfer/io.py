"""Atomic file and folder writes, and content digests.

A stage killed half-way must never leave a file that looks whole: everything
is written to a temporary name in the destination folder, then renamed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


# A write that fails for want of room: the disk is full, a quota is reached, or the
# process's file-size limit (ulimit -f) is (with SIGXFSZ ignored, write() fails with EFBIG).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class NoSpaceError(OSError):
    """A write failed for want of space or under a file-size limit; the message names the path and the bytes."""


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _is_no_space(err: OSError) -> bool:
    # numpy's tofile (np.save to a real file) reports a short write as "N requested and M written", without errno.
    return err.errno in NO_SPACE_ERRNOS or (err.errno is None and " requested and " in str(err))


@contextlib.contextmanager
def naming_no_space(dest: str | Path, tmp: str | Path | None = None, size: int | None = None) -> Iterator[None]:
    """Turn a failed write of `dest` (through `tmp`) for want of room into a NoSpaceError that says so.

    The message names the path, the bytes needed (`size`; else at least what was
    written before the failure), the bytes free on its file system and the
    process's file-size limit if it has one. Other errors pass unchanged.
    """
    try:
        yield
    except OSError as err:
        if isinstance(err, NoSpaceError) or not _is_no_space(err):
            raise
        dest = Path(dest)
        written = None
        with contextlib.suppress(OSError):
            written = Path(tmp).stat().st_size if tmp is not None else None
        needed = f"{size:,} bytes" if size is not None else f"more than {written or 0:,} bytes"
        stopped = f", and stopped after {written:,}" if written is not None else ""
        try:
            free = f"{shutil.disk_usage(dest.parent).free:,} bytes free"
        except OSError:
            free = "an unknown number of bytes free"
        limit = _file_size_limit()
        cap = f"; this process may write files of at most {limit:,} bytes (its file-size limit, ulimit -f)" if limit is not None else ""
        code = errno.errorcode.get(err.errno, "") if err.errno else ""
        raise NoSpaceError(
            err.errno,
            f"no room to write {dest}: it needs {needed}{stopped}; its file system has {free}{cap} "
            f"({code + ': ' if code else ''}{err.strerror or err}). Free some space or raise the limit and run again: what was finished is kept",
        ) from err


def fsync_file(path: str | Path) -> None:
    """Flush `path`'s bytes to the disk, so a rename never publishes a file whose data is not there yet."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under `path` (a staged folder, before it is renamed in)."""
    for folder, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_file(Path(folder) / name)
        fsync_dir(folder)


def write_bytes(dest: str | Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp, naming_no_space(dest, tmp, len(data)):
        tmp.write_bytes(data)
    return Path(dest)


def write_text(dest: str | Path, text: str) -> Path:
    return write_bytes(dest, text.encode())


def write_json(dest: str | Path, obj: Any) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(dest: str | Path, obj: Any) -> Path:
    """torch.save, atomically and byte-for-byte reproducible.

    torch.save to a path names the archive's inner folder after the file,
    here a random temporary name; saving to a buffer names it "archive", so
    equal weights give equal files and equal DVC hashes.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(dest, buffer.getvalue())


def save_with(dest: str | Path, save: Callable[[Path], None], size: int | None = None) -> Path:
    """Call `save(tmp_path)` (torch.save, np.save, fig.savefig...) atomically; `size`: the bytes it will write, if known."""
    with atomic_path(dest) as tmp, naming_no_space(dest, tmp, size):
        save(tmp)
    return Path(dest)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it in for `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` to `dst` (free, same inode), or copy it where a link is impossible; True if linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:  # another filesystem (EXDEV), or one without hard links
        shutil.copyfile(src, dst)
        return False


# What atomic_path / atomic_dir leave behind when the process is killed mid-write:
# `.<name>.<8 random characters>.tmp` (a file or a staging folder) or `.old`.
LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")


def remove_leftovers(outputs: list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    """Remove what a killed writer left in and beside `outputs`; return what was removed.

    Beside each output only its own temporaries (`.<output name>.*.tmp|old`);
    inside an output folder, any leftover at any depth. Call it before a stage
    writes, never while another run of the same stage is writing.
    """
    removed: list[Path] = []

    def drop(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)

    for out in map(Path, outputs):
        if out.parent.is_dir():
            for entry in out.parent.iterdir():
                if entry.name.startswith(f".{out.name}.") and LEFTOVER.match(entry.name):
                    drop(entry)
        if out.is_dir() and not out.is_symlink():
            for folder, dirs, files in os.walk(out):
                for name in [*dirs, *files]:
                    if LEFTOVER.match(name):
                        drop(Path(folder) / name)
                dirs[:] = [d for d in dirs if not LEFTOVER.match(d)]
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
