"""Unpack a zip or tar archive safely: nothing outside `dest`, nothing unbounded, nothing half-done.

Archives come from the internet, so every entry is checked before a byte is
written, and the archive is refused whole if any entry
  - is absolute (/x, \\x, C:x) or climbs out of dest with `..`,
  - is a symlink or hard link whose target lies outside dest, or lies under a symlink,
  - is a device, fifo or socket,
or if the declared sizes add up to more than `max_bytes`. While writing, the
bytes actually produced are counted too (zip headers can lie).

Entries are written by this module, never by tarfile/zipfile's extractall,
so zip and tar follow the same rules: files, folders and hard links (copied)
first, symlinks last, so no file is ever written through a symlink; then
every symlink is resolved on disk once more, which catches chains that only
escape once all of them exist. The result is built beside dest and published
by one rename (xfer.io.atomic_dir): on any error dest is as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from xfer.io import atomic_dir

KINDS = "zip, tar, tar.gz, tar.xz, tar.bz2"
JUNK_FOLDERS = frozenset({"__MACOSX"})  # resource forks macOS's Finder adds to zips
JUNK_FILES = frozenset({".DS_Store"})
MAX_SYMLINK_TARGET = 4096
_CHUNK = 1 << 20
_DRIVE = re.compile(r"[A-Za-z]:")
# What a damaged or truncated archive raises while being read.
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


class UnsafeArchiveError(ValueError):
    """An entry would land outside the destination, or is not a plain file, folder or link."""


class ArchiveTooLargeError(ValueError):
    """The archive unpacks to more bytes than allowed (a zip bomb, or simply too big)."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # as stored in the archive, for messages
    kind: str  # "file", "dir", "symlink" or "hardlink"
    size: int = 0  # declared bytes (files only)
    link: str = ""  # symlink: its target as stored; hard link: the entry it repeats
    open: Callable | None = None  # files: a binary stream of the content
    parts: tuple[str, ...] = ()  # where it goes, relative to dest
    link_parts: tuple[str, ...] = ()  # hard link: the file it copies, relative to dest


def archive_kind(path: Path) -> str:
    """ "zip" or "tar" (compressed or not), recognised by content, not by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"archive {path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(2)
    # A zip is checked by its first bytes before tar: an uncompressed tar whose
    # last member is a zip file would otherwise pass zipfile.is_zipfile.
    if head == b"PK" and zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    if zipfile.is_zipfile(path):  # a zip behind a prefix (self-extracting)
        return "zip"
    raise ValueError(f"{path} is not an archive that can be unpacked: supported kinds are {KINDS} (recognised by content, not by name)")


def extract_archive(archive: Path, dest: Path, *, max_bytes: int, progress: bool = True) -> Path:
    """Unpack `archive` into the folder `dest` (replaced whole, or left as it was); returns dest."""
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    with _damaged(archive, kind), _open(archive, kind) as entries:
        plan = _plan(archive, entries)
        declared = sum(e.size for e in plan)
        if declared > max_bytes:
            raise ArchiveTooLargeError(f"{archive} would unpack to {declared} bytes, over the limit of {max_bytes} bytes")
        with atomic_dir(dest) as tmp:
            _write(archive, plan, tmp, _Budget(archive, max_bytes, declared), progress)
    return dest


@contextlib.contextmanager
def _damaged(archive: Path, kind: str) -> Iterator[None]:
    """Name the archive when the zip/tar reader fails on its bytes."""
    try:
        yield
    except _DAMAGED as e:
        raise ValueError(f"{archive}: damaged or truncated {kind} archive: {e}") from e


@contextlib.contextmanager
def _open(archive: Path, kind: str) -> Iterator[list[_Entry]]:
    """Every entry of the archive, readable while the context lasts."""
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            yield [_zip_entry(archive, zf, info) for info in zf.infolist()]
    else:
        with tarfile.open(archive, "r:*") as tf:
            yield [_tar_entry(archive, tf, member) for member in tf.getmembers()]


def _zip_entry(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Entry:
    """A zip entry; Unix zips (Info-ZIP, Python) keep the file type in external_attr's high bits."""
    fmt = stat.S_IFMT(info.external_attr >> 16)
    if fmt == stat.S_IFLNK:
        if info.file_size > MAX_SYMLINK_TARGET:
            raise UnsafeArchiveError(f"{archive}: symlink {info.filename!r} has a {info.file_size}-byte target; at most {MAX_SYMLINK_TARGET} are accepted")
        return _Entry(info.filename, "symlink", link=zf.read(info).decode("utf-8", errors="replace"))
    if fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        _refuse_special(
            archive, info.filename, {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}[fmt]
        )
    if info.is_dir() or fmt == stat.S_IFDIR:
        return _Entry(info.filename, "dir")
    return _Entry(info.filename, "file", size=info.file_size, open=functools.partial(zf.open, info))


def _tar_entry(archive: Path, tf: tarfile.TarFile, member: tarfile.TarInfo) -> _Entry:
    if member.isreg():
        return _Entry(member.name, "file", size=member.size, open=functools.partial(tf.extractfile, member))
    if member.isdir():
        return _Entry(member.name, "dir")
    if member.issym():
        return _Entry(member.name, "symlink", link=member.linkname)
    if member.islnk():
        return _Entry(member.name, "hardlink", link=member.linkname)
    if member.ischr() or member.isblk():
        _refuse_special(archive, member.name, "device")
    if member.isfifo():
        _refuse_special(archive, member.name, "fifo")
    _refuse_special(archive, member.name, f"entry of unknown tar type {member.type!r}")


def _refuse_special(archive: Path, name: str, what: str):
    raise UnsafeArchiveError(f"{archive}: entry {name!r} is a {what}; only files, folders and links inside the archive are unpacked")


def _plan(archive: Path, entries: list[_Entry]) -> list[_Entry]:
    """The entries to write, each placed under dest; refuses the archive on the first unsafe one."""
    plan, files = [], set()
    for entry in entries:
        parts = _entry_parts(archive, entry.name)
        link_parts = ()
        if entry.kind == "symlink":
            _check_symlink(archive, entry, parts)
        elif entry.kind == "hardlink":
            link_parts = _hardlink_target(archive, entry)
        if not parts or is_junk(parts):
            continue
        if entry.kind == "file":
            files.add(parts)
        elif entry.kind == "hardlink" and link_parts not in files:
            raise UnsafeArchiveError(f"{archive}: hard link {entry.name!r} -> {entry.link!r} names no file earlier in the archive")
        plan.append(dataclasses.replace(entry, parts=parts, link_parts=link_parts))
    symlinks = {e.parts for e in plan if e.kind == "symlink"}
    for entry in plan:
        for i in range(1, len(entry.parts)):
            if entry.parts[:i] in symlinks:
                raise UnsafeArchiveError(
                    f"{archive}: entry {entry.name!r} lies under the symlink {'/'.join(entry.parts[:i])!r}; writing through a link is refused"
                )
    return plan


def is_junk(parts: tuple[str, ...]) -> bool:
    """macOS's `__MACOSX/` resource forks and `.DS_Store` files: never part of a dataset."""
    return any(p in JUNK_FOLDERS for p in parts) or parts[-1] in JUNK_FILES


def _entry_parts(archive: Path, name: str) -> tuple[str, ...]:
    parts = _resolve(name)
    if parts is None:
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} {'is an absolute path' if _is_absolute(name) else 'climbs out of the destination with ..'}; "
            "every entry must stay inside the folder the archive is unpacked into"
        )
    return parts


def _check_symlink(archive: Path, entry: _Entry, parts: tuple[str, ...]) -> None:
    """A symlink's target, relative to the folder holding it, must stay inside dest."""
    if _is_absolute(entry.link) or _resolve(entry.link, parts[:-1]) is None:
        raise UnsafeArchiveError(f"{archive}: symlink {entry.name!r} -> {entry.link!r} points outside the destination folder")


def _hardlink_target(archive: Path, entry: _Entry) -> tuple[str, ...]:
    """A tar hard link names an earlier entry, relative to the archive's root: it must lie inside dest."""
    target = _resolve(entry.link)
    if not target:
        raise UnsafeArchiveError(f"{archive}: hard link {entry.name!r} -> {entry.link!r} points outside the destination folder")
    return target


def _is_absolute(name: str) -> bool:
    """POSIX (/x) and Windows (\\x, \\\\server\\x, C:\\x, C:x) absolute or drive-relative paths."""
    return name.startswith(("/", "\\")) or _DRIVE.match(name) is not None


def _resolve(name: str, base: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """`name` (relative to `base`) as components below the root, `..` applied; None if absolute or above it.

    Backslashes count as separators: zips made on Windows may use them, and
    treating them so can only refuse more, never less.
    """
    if _is_absolute(name):
        return None
    parts = list(base)
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


class _Budget:
    """Bytes actually written, against the limit: a lying header cannot unpack a bomb."""

    def __init__(self, archive: Path, max_bytes: int, declared: int):
        self.archive, self.max_bytes, self.declared, self.written = archive, max_bytes, declared, 0

    def copy(self, src, dst) -> None:
        while block := src.read(_CHUNK):
            self.written += len(block)
            if self.written > self.max_bytes:
                raise ArchiveTooLargeError(
                    f"{self.archive} unpacked to more than {self.max_bytes} bytes (the limit) although its headers "
                    f"declare {self.declared} bytes; stopped after {self.written} bytes"
                )
            dst.write(block)


def _write(archive: Path, plan: list[_Entry], root: Path, budget: _Budget, progress: bool) -> None:
    """Files, folders and hard links in archive order, then symlinks, then every symlink checked on disk."""
    ordered = [e for e in plan if e.kind != "symlink"] + [e for e in plan if e.kind == "symlink"]
    for entry in tqdm(ordered, desc=f"unpacking {archive.name}", unit="entry", disable=not progress):
        path = root.joinpath(*entry.parts)
        if entry.kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
            continue
        _make_parent(archive, entry, root, path)
        if entry.kind == "file":
            with entry.open() as src, open(path, "wb") as dst:
                budget.copy(src, dst)
        elif entry.kind == "hardlink":
            # Copied, not linked: no two paths share an inode a later entry could overwrite.
            with open(root.joinpath(*entry.link_parts), "rb") as src, open(path, "wb") as dst:
                budget.copy(src, dst)
        else:
            if path.is_symlink():  # a later entry of the same name replaces an earlier one
                path.unlink()
            os.symlink(entry.link, path)
    for entry in plan:
        if entry.kind == "symlink" and not _inside(root, root.joinpath(*entry.parts)):
            raise UnsafeArchiveError(f"{archive}: symlink {entry.name!r} -> {entry.link!r} resolves outside the destination through other symlinks")


def _make_parent(archive: Path, entry: _Entry, root: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(root, path.parent):  # cannot happen with symlinks made last; a second defence
        raise UnsafeArchiveError(f"{archive}: entry {entry.name!r} would be written outside the destination")


def _inside(root: Path, path: Path) -> bool:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)
