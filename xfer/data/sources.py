"""Where a dataset comes from: `params.data.dataset` resolved to one source.

    digits / builtin:digits      generated offline (xfer/data/digits.py)
    office31, pacs, ...          an entry of xfer/data/registry.yaml (data, not code)
    ./folder, /abs/folder        a local folder: <domain>/[wrapper/]<class>/<image>
    ./archive.tar.gz             a local archive (zip, tar, tar.gz, tar.xz)
    https://host/archive.zip     a downloaded archive; `data.sha256` is required

Resolution only looks at the params and the registry; whether a local path
exists is checked by `check_source`, against the project root.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import yaml

from xfer.redact import redact_url

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")
LOADERS = ("digits", "archive", "torchvision")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar", ".zip")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class SourceError(ValueError):
    """`data.dataset` (with its sha256, name, domains) does not name a usable source."""


@dataclass(frozen=True)
class Archive:
    """One archive: an http(s) URL or a local file, and the digest it must have.

    sha256 wherever one is known; md5 only for registry archives whose
    publishers give nothing stronger. Neither: only a local file may lack both.
    """

    location: str
    sha256: str | None
    filename: str
    md5: str | None = None
    domain: str | None = None  # torchvision loader: the domain this file belongs to

    @property
    def is_url(self) -> bool:
        return urlparse(self.location).scheme in ("http", "https")


@dataclass(frozen=True)
class DatasetSource:
    kind: str  # one of LOADERS, or "folder"
    name: str  # the folder under data/raw/
    # {domain: folder holding one folder per class, relative to the unpacked dataset};
    # None: found from the folder structure.
    domains: dict[str, str] | None
    archives: tuple[Archive, ...] = ()
    folder: str | None = None
    entry: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """What dataset.json records about where the data came from."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.archives:
            out["archives"] = [{"location": redact_url(a.location), "sha256": a.sha256} for a in self.archives]
        if self.folder:
            out["folder"] = self.folder
        return out


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Any]]:
    """The registry of known datasets, validated once: a bad entry is a bug in this package."""
    entries = yaml.safe_load(REGISTRY_FILE.read_text())
    for name, entry in entries.items():
        problems = registry_entry_problems(name, entry)
        if problems:
            raise SourceError(f"{REGISTRY_FILE}: entry {name!r}: {'; '.join(problems)}")
    return entries


def registry_entry_problems(name: str, entry: Any) -> list[str]:
    """Why `entry` is not a usable registry entry (empty when it is)."""
    if not isinstance(entry, dict):
        return ["not a mapping"]
    problems = []
    if entry.get("loader") not in LOADERS:
        problems.append(f"loader must be one of {list(LOADERS)}, got {entry.get('loader')!r}")
    domains = entry.get("domains")
    if not isinstance(domains, dict) or not domains or not all(isinstance(v, str) and v for v in domains.values()):
        problems.append("domains must map each domain name to its folder of class folders")
    if entry.get("loader") != "digits":
        archives = entry.get("archives")
        if not isinstance(archives, list) or not archives:
            problems.append("archives must list at least one {url, sha256}")
        else:
            for i, a in enumerate(archives):
                if not isinstance(a, dict) or urlparse(str(a.get("url", ""))).scheme not in ("http", "https"):
                    problems.append(f"archives[{i}].url must be an http(s) URL")
                    continue
                if "sha256" in a and not re.fullmatch(r"[0-9a-f]{64}", str(a["sha256"])):
                    problems.append(f"archives[{i}].sha256 must be 64 lowercase hex digits")
                if "md5" in a and not re.fullmatch(r"[0-9a-f]{32}", str(a["md5"])):
                    problems.append(f"archives[{i}].md5 must be 32 lowercase hex digits")
                if "sha256" not in a and "md5" not in a and not entry.get("unverified"):
                    problems.append(f"archives[{i}] needs a sha256 (or the md5 its publisher gives), or the entry says why it is `unverified`")
                if entry.get("loader") == "torchvision" and a.get("domain") not in domains:
                    problems.append(f"archives[{i}].domain must be one of the entry's domains")
    return problems


def slug(text: str) -> str:
    """A folder / domain name safe in paths, CSV and MLflow metric keys."""
    out = _NAME_CHARS.sub("_", text).strip("_.")
    return out or "dataset"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one path part (a domain, class or image name); None when it can.

    Domain and class names become folders under data/raw/<name>/ and keys of
    CSV files, JSON and MLflow: one plain path part of valid text, never a way
    out of that folder.
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    if any("\ud800" <= c <= "\udfff" for c in name):
        return "is not valid UTF-8 text (a folder name in another encoding, such as Latin-1)"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a name inside one"
    if name.startswith("/") or "/" in name or "\\" in name:
        return "is a path (absolute, or with '/' or '\\'), not one folder name"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character (a newline, tab, ...)"
    if name.startswith("."):
        return "starts with '.' (hidden folders are skipped)"
    if len(os.fsencode(name)) > 255:
        return "is longer than 255 bytes"
    return None


def shown_name(name: str) -> str:
    """`name` quoted for a message, with bytes that are not UTF-8 written as escapes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(name))[1:]
    return repr(name)


def archive_stem(filename: str) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return Path(filename).stem


def is_archive_name(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or "/" in value or "\\" in value or is_archive_name(value)


def resolve_source(cfg) -> DatasetSource:
    """`cfg` is a DataConfig (typed loosely: config.py imports this module)."""
    value = cfg.dataset.strip()
    scheme = urlparse(value).scheme
    if "://" in value:
        if scheme not in ("http", "https"):
            raise SourceError(f"data.dataset {value!r}: only http:// and https:// URLs can be fetched (or give a local path)")
        filename = PurePosixPath(urlparse(value).path).name
        if not is_archive_name(filename):
            raise SourceError(f"data.dataset {value!r}: a URL must end in one of {list(ARCHIVE_SUFFIXES)}")
        if cfg.sha256 is None:
            raise SourceError(f"data.sha256 is required with a URL: the sha256 of {filename}, checked before anything is unpacked")
        name = cfg.name or slug(archive_stem(filename))
        return DatasetSource("archive", name, cfg.domains, (Archive(value, cfg.sha256.lower(), filename),))
    if _looks_like_path(value):
        path = Path(value).expanduser()
        if is_archive_name(path.name):
            archive = Archive(str(path), cfg.sha256.lower() if cfg.sha256 else None, path.name)
            return DatasetSource("archive", cfg.name or slug(archive_stem(path.name)), cfg.domains, (archive,))
        return DatasetSource("folder", cfg.name or slug(path.resolve().name), cfg.domains, folder=str(path))
    key = value.removeprefix("builtin:")
    entries = registry()
    if key not in entries:
        raise SourceError(
            f"data.dataset {value!r} is not a known dataset; choose from {sorted(entries)}, "
            f"or give a local folder (./path), a local archive, or an https:// URL with data.sha256"
        )
    if cfg.sha256 is not None:
        raise SourceError(f"data.sha256 is for a URL or local archive; {key!r} has its digests in the registry (set it to null)")
    entry = entries[key]
    archives = tuple(
        Archive(a["url"], a.get("sha256"), a.get("filename") or PurePosixPath(urlparse(a["url"]).path).name, a.get("md5"), a.get("domain"))
        for a in entry.get("archives", [])
    )
    return DatasetSource(entry["loader"], cfg.name or key, cfg.domains or dict(entry["domains"]), archives, entry=entry)


def check_params(params, root: Path) -> None:
    """The dataset `params.data` names can be fetched into the project at `root`."""
    check_source(resolve_source(params.data), root)


def check_source(source: DatasetSource, root: Path) -> None:
    """Local paths exist (relative ones against the project root) and every download
    can be verified; raise SourceError if not."""
    if source.entry is not None and source.entry.get("unverified"):
        raise SourceError(
            f"{source.name!r} is not fetched automatically: {source.entry['unverified']}. Download "
            f"{', '.join(a.location for a in source.archives)} yourself, check them, then set data.dataset to the "
            f"unpacked folder (./path) with data.domains: {source.domains}"
        )
    if source.folder is not None:
        folder = local_path(source.folder, root)
        if not folder.is_dir():
            raise SourceError(f"data.dataset: folder not found: {folder}")
    for archive in source.archives:
        if not archive.is_url and not local_path(archive.location, root).is_file():
            raise SourceError(f"data.dataset: archive not found: {local_path(archive.location, root)}")


def local_path(value: str, root: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path
