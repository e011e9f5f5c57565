"""extract_archive(): zip and tar alike, nothing outside dest, bounded, all or nothing (tiny archives built here)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from xfer.data import archives
from xfer.data.archives import ArchiveTooLargeError, UnsafeArchiveError, archive_kind, extract_archive

FILES = {
    "top/a/1.txt": b"one",
    "top/b/2.bin": bytes(range(256)) * 20,
    "top/b/empty.txt": b"",
}
TOTAL = sum(len(v) for v in FILES.values())
TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz", "tar.bz2": "w:bz2"}


def make_zip(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None, dirs=()) -> Path:
    """A zip as Info-ZIP writes one on Unix: symlinks carry S_IFLNK in external_attr, the target as content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in dirs:
            zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", symlinks=None, hardlinks=None, special=(), dirs=()) -> Path:
    """A tar with regular files, then symlinks / hard links / special members {name: (type)}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for links, kind in ((symlinks, tarfile.SYMTYPE), (hardlinks, tarfile.LNKTYPE)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type, info.linkname = kind, target
                tf.addfile(info)
        for name, kind in special:
            info = tarfile.TarInfo(name)
            info.type = kind
            tf.addfile(info)
    return path


def tree(root: Path) -> dict[str, object]:
    """Everything under root: files as bytes, symlinks as '-> target', folders as '/'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "/" if p.is_dir() else p.read_bytes()
    return out


def files_only(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(root).items() if isinstance(v, bytes)}


@pytest.fixture
def dest(tmp_path) -> Path:
    """Where archives unpack; its parent holds nothing else, so leftovers are easy to see."""
    return tmp_path / "out" / "dest"


def beside(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else []


def assert_refused(archive: Path, dest: Path, error: type[Exception], match: str, max_bytes: int = 10**6) -> Exception:
    """The archive is refused, and leaves neither dest nor temporary folders; an earlier dest survives as it was."""
    with pytest.raises(error, match=match) as failure:
        extract_archive(archive, dest, max_bytes=max_bytes, progress=False)
    assert beside(dest) == []
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_bytes(b"earlier good copy")
    with pytest.raises(error, match=match):
        extract_archive(archive, dest, max_bytes=max_bytes, progress=False)
    assert beside(dest) == ["dest"] and tree(dest) == {"keep.txt": b"earlier good copy"}
    return failure.value


@pytest.mark.parametrize("kind", ["zip", *TAR_MODES])
def test_zip_and_every_tar_kind_unpack_to_the_same_files(tmp_path, dest, kind):
    path = tmp_path / "in" / f"set.{kind}"
    if kind == "zip":
        make_zip(path, FILES, dirs=["top/emptydir"])
    else:
        make_tar(path, FILES, TAR_MODES[kind], dirs=["top/emptydir"])
    assert archive_kind(path) == ("zip" if kind == "zip" else "tar")
    assert extract_archive(path, dest, max_bytes=TOTAL, progress=False) == dest
    assert files_only(dest) == FILES
    assert (dest / "top/emptydir").is_dir()
    assert beside(dest) == ["dest"]


def test_unpacking_again_replaces_the_folder_whole(tmp_path, dest):
    extract_archive(make_zip(tmp_path / "in/a.zip", {"old.txt": b"1"}), dest, max_bytes=100, progress=False)
    extract_archive(make_zip(tmp_path / "in/b.zip", {"new.txt": b"2"}), dest, max_bytes=100, progress=False)
    assert tree(dest) == {"new.txt": b"2"} and beside(dest) == ["dest"]


def test_kind_is_found_by_content_and_other_files_say_what_is_supported(tmp_path):
    misnamed = make_zip(tmp_path / "really_a_zip.tar.gz", FILES)
    assert archive_kind(misnamed) == "zip"
    text = tmp_path / "notes.zip"
    text.write_text("not an archive")
    gz = tmp_path / "image.gz"
    gz.write_bytes(gzip.compress(b"just some gzipped bytes, no tar inside"))
    for path in (text, gz):
        with pytest.raises(ValueError, match="supported kinds are zip, tar, tar.gz, tar.xz, tar.bz2") as failure:
            archive_kind(path)
        assert str(path) in str(failure.value)


def test_macos_junk_is_skipped(tmp_path, dest):
    junk = {"__MACOSX/top/a/._1.txt": b"resource fork", "top/.DS_Store": b"finder", "top/a/.DS_Store": b"finder"}
    extract_archive(make_zip(tmp_path / "in/mac.zip", {**FILES, **junk}), dest, max_bytes=TOTAL, progress=False)
    assert files_only(dest) == FILES
    assert not (dest / "__MACOSX").exists()


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/abs/evil", "..\\evil", "\\abs\\evil", "C:\\evil", "C:evil"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_entries_that_escape_dest_are_refused(tmp_path, dest, name, kind):
    files = {**FILES, name: b"evil"}  # the good entries come first: nothing may be written before the refusal
    path = make_zip(tmp_path / "in/bad.zip", files) if kind == "zip" else make_tar(tmp_path / "in/bad.tar", files, "w")
    error = assert_refused(path, dest, UnsafeArchiveError, "absolute path|climbs out")
    assert repr(name) in str(error) and str(path) in str(error)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()


def test_a_dotdot_that_stays_inside_is_allowed(tmp_path, dest):
    extract_archive(make_tar(tmp_path / "in/ok.tar", {"a/../b/x.txt": b"x"}, "w"), dest, max_bytes=10, progress=False)
    assert files_only(dest) == {"b/x.txt": b"x"}


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", "a/../../.."])
def test_tar_symlinks_pointing_outside_are_refused(tmp_path, dest, target):
    path = make_tar(tmp_path / "in/link.tar.gz", FILES, symlinks={"top/link": target})
    error = assert_refused(path, dest, UnsafeArchiveError, "points outside")
    assert repr(target) in str(error)


@pytest.mark.parametrize("target", ["../outside.txt", "/etc/passwd"])
def test_tar_hardlinks_pointing_outside_are_refused(tmp_path, dest, target):
    path = make_tar(tmp_path / "in/hard.tar.gz", FILES, hardlinks={"top/hard": target})
    assert_refused(path, dest, UnsafeArchiveError, "hard link .* points outside")


def test_zip_symlink_pointing_outside_is_refused(tmp_path, dest):
    path = make_zip(tmp_path / "in/link.zip", FILES, symlinks={"top/link": "../../../outside"})
    assert_refused(path, dest, UnsafeArchiveError, "symlink 'top/link' -> '../../../outside' points outside")


def test_links_inside_dest_are_kept(tmp_path, dest):
    tar = make_tar(tmp_path / "in/links.tar", FILES, "w", symlinks={"top/link": "a/1.txt", "top/dirlink": "b"}, hardlinks={"top/copy.txt": "top/a/1.txt"})
    extract_archive(tar, dest, max_bytes=10**6, progress=False)
    assert os.readlink(dest / "top/link") == "a/1.txt" and (dest / "top/link").read_bytes() == b"one"
    assert (dest / "top/dirlink/2.bin").read_bytes() == FILES["top/b/2.bin"]
    assert not (dest / "top/copy.txt").is_symlink() and (dest / "top/copy.txt").read_bytes() == b"one"
    zipped = make_zip(tmp_path / "in/links.zip", FILES, symlinks={"top/b/up": "../a/1.txt"})
    extract_archive(zipped, dest, max_bytes=10**6, progress=False)
    assert os.readlink(dest / "top/b/up") == "../a/1.txt" and (dest / "top/b/up").read_bytes() == b"one"


def test_a_symlink_chain_that_only_escapes_once_all_links_exist_is_refused(tmp_path, dest):
    # Each target looks inside on its own: x/y -> ../up/.. is the root, if `up` were a folder.
    # With up -> . on disk, x/y resolves to the root's parent.
    path = make_tar(tmp_path / "in/chain.tar", {"x/f.txt": b"f"}, "w", symlinks={"x/y": "../up/..", "up": "."})
    assert_refused(path, dest, UnsafeArchiveError, "resolves outside the destination")


def test_writing_through_a_symlink_is_refused(tmp_path, dest):
    tar = tmp_path / "in/through.tar"
    tar.parent.mkdir(parents=True)
    with tarfile.open(tar, "w") as tf:
        link = tarfile.TarInfo("s")
        link.type, link.linkname = tarfile.SYMTYPE, "sub"
        tf.addfile(link)
        info = tarfile.TarInfo("s/f.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert_refused(tar, dest, UnsafeArchiveError, "lies under the symlink 's'")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_are_refused(tmp_path, dest, kind):
    path = make_tar(tmp_path / "in/dev.tar", FILES, "w", special=[("top/dev", kind)])
    assert_refused(path, dest, UnsafeArchiveError, "'top/dev' is a (device|fifo)")


def test_zip_fifo_is_refused(tmp_path, dest):
    path = tmp_path / "in/fifo.zip"
    make_zip(path, FILES)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("top/pipe")
        info.create_system, info.external_attr = 3, (stat.S_IFIFO | 0o644) << 16
        zf.writestr(info, b"")
    assert_refused(path, dest, UnsafeArchiveError, "'top/pipe' is a fifo")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_declared_size_over_the_limit_is_refused(tmp_path, dest, kind):
    path = make_zip(tmp_path / "in/big.zip", FILES) if kind == "zip" else make_tar(tmp_path / "in/big.tar.gz", FILES)
    error = assert_refused(path, dest, ArchiveTooLargeError, "over the limit", max_bytes=TOTAL - 1)
    assert str(TOTAL) in str(error) and str(TOTAL - 1) in str(error)


def test_a_zip_whose_headers_understate_the_size_is_refused(tmp_path, dest):
    """Central directory and local header both claim 10 bytes for 100 kB of zeros."""
    path = make_zip(tmp_path / "in/liar.zip", {"zeros.bin": bytes(100_000)})
    raw = bytearray(path.read_bytes())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    raw[local + 22 : local + 26] = (10).to_bytes(4, "little")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("zeros.bin").file_size == 10
    # zipfile itself stops at the declared size, then fails the CRC: refused as damaged.
    assert_refused(path, dest, ValueError, "damaged|unpacked to more than", max_bytes=1000)


def test_bytes_written_are_counted_whatever_the_headers_say(tmp_path, dest, monkeypatch):
    """A reader that trusts no header: sizes declared as 0, the real bytes must still stop at the limit."""
    real = archives._zip_entry
    monkeypatch.setattr(archives, "_zip_entry", lambda *a: dataclasses.replace(real(*a), size=0))
    path = make_zip(tmp_path / "in/bomb.zip", {"zeros.bin": bytes(5_000_000)})
    error = assert_refused(path, dest, ArchiveTooLargeError, "unpacked to more than 1000000 bytes", max_bytes=1_000_000)
    assert "declare 0 bytes" in str(error)


def test_a_truncated_archive_is_reported_as_damaged(tmp_path, dest):
    path = make_tar(tmp_path / "in/cut.tar.gz", {"big.bin": os.urandom(200_000)})
    path.write_bytes(path.read_bytes()[:-50_000])
    error = assert_refused(path, dest, ValueError, "damaged or truncated tar archive")
    assert str(path) in str(error)


def test_progress_bar_counts_entries_and_can_be_turned_off(tmp_path, dest, capsys):
    path = make_zip(tmp_path / "in/set.zip", FILES)
    extract_archive(path, dest, max_bytes=TOTAL, progress=False)
    assert capsys.readouterr().err == ""
    extract_archive(path, dest, max_bytes=TOTAL, progress=True)
    assert "unpacking set.zip" in capsys.readouterr().err
