"""Download one file over http(s): resumable, verified, published by one rename.

    dest exists with the right sha256 -> nothing to do, no network
    otherwise stream into <dest>.part  -> a dropped connection reconnects with
        `Range: bytes=<bytes so far>-` (206 appends; 200 means the server ignores
        Range: start over), up to `attempts` connections
    complete -> sha256 of the .part as read back from disk checked
             -> os.replace(<dest>.part, dest)

The .part is locked (flock) while a call works on it: a second download of
the same file, in another process, waits for the first, then finds `dest`
published and verified and downloads nothing. Two calls never append to one
.part, and what is published is checked against the bytes on disk, not the
bytes this call meant to write.

A .part that survives a failed call (network down for longer than the
attempts last) is resumed by the next call, e.g. a Prefect task retry: a
multi-gigabyte archive is never fetched twice because a connection dropped.
Standard library only (urllib), so the core package needs no new dependency.

Credentials never appear in the URL a caller passes (params.yaml refuses
them, see xfer/redact.py): a user name and password come from ~/.netrc (or
the file $NETRC names) for the URL's host, sent as basic auth that no
redirect carries on; secret query parameters (a token, a signature) come as
`query` and are appended for the request only. Every message names the URL
redacted.
"""

from __future__ import annotations

import base64
import http.client
import netrc
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from xfer import __version__
from xfer.io import sha256_file
from xfer.locks import locked_file
from xfer.redact import redact, redact_url, with_query

USER_AGENT = f"xfer/{__version__} (dataset download; Python urllib)"
SCHEMES = ("http", "https")
# Worth asking again within the same call: the server may be busy, not wrong.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
BACKOFF_S = 1.0  # first pause between connections; doubles, at most BACKOFF_MAX_S
BACKOFF_MAX_S = 15.0
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class DownloadError(RuntimeError):
    """The network failed and went on failing for every attempt: retrying later may help."""


class ChecksumError(ValueError):
    """The bytes arrived but are not the file expected: retrying will not help."""


class _Retry(Exception):
    """This connection failed in a way another connection may not (internal)."""


def download(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    progress: bool = True,
    attempts: int = 5,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
    query: str | None = None,
) -> Path:
    """Make `dest` a copy of `url` whose sha256 is `sha256`; returns `dest`.

    sha256=None skips the check (the caller decides whether that is allowed) but
    still publishes atomically. Raises DownloadError when every attempt failed
    (the .part is kept for the next call), ChecksumError on a wrong digest (the
    .part is deleted; an earlier `dest` is left as it was). `query` (``token=...``)
    is appended to the URL of each request and appears nowhere else.
    """
    check_url(url)
    expected = check_sha256(sha256)
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    dest = Path(dest)
    if expected is not None and dest.is_file() and sha256_file(dest) == expected:
        return dest
    target = _Target(with_query(url, query), redact_url(url), netrc_authorization(url))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_file = part_path(dest)
    with locked_file(part_file, on_wait=lambda: print(f"another process is downloading {part_file}: waiting for it to finish", file=sys.stderr, flush=True)):
        try:
            # Whoever held the .part may have published a verified dest meanwhile.
            if expected is not None and dest.is_file() and sha256_file(dest) == expected:
                return dest
            return _download_locked(target, dest, expected, _PartFile(part_file), attempts, timeout, chunk_size, progress)
        finally:
            if part_file.is_file() and part_file.stat().st_size == 0:
                part_file.unlink()  # created by the lock, nothing received: nothing to resume


def _download_locked(
    target: _Target, dest: Path, expected: str | None, part: _PartFile, attempts: int, timeout: float, chunk_size: int, progress: bool
) -> Path:
    """download(), once this process holds the lock of the .part."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    url = target.shown
    failures = []
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            time.sleep(backoff(attempt - 1))
        try:
            _transfer(opener, target, part, timeout, chunk_size, progress, dest.name)
            break
        except _Retry as e:
            failures.append(f"attempt {attempt}: {e}")
    else:
        raise DownloadError(
            f"downloading {url} failed {attempts} times ({'; '.join(failures)}); "
            f"the {part.size()} bytes received are kept in {part.path}, and the next call resumes from there"
        )
    if expected is not None:
        actual = sha256_file(part.path)  # the bytes on disk, whoever wrote them
        if actual != expected:
            part.path.unlink()
            raise ChecksumError(
                f"{url}: sha256 mismatch: expected {expected}, got {actual}; the download was deleted"
                + (f" and the earlier {dest} left as it was" if dest.exists() else "")
            )
    os.replace(part.path, dest)
    return dest


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or not parts.netloc:
        raise ValueError(f"cannot download {redact_url(url)!r}: only http:// and https:// URLs are allowed (a local file is given by its path)")


def check_sha256(sha256: str | None) -> str | None:
    """The digest in lower case, refused before any network access if it cannot be one."""
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits (or None to skip the check), got {sha256!r}")
    return sha256.lower()


def part_path(dest: Path) -> Path:
    """Where an unfinished download of `dest` lives: same folder, so publishing is a rename."""
    return dest.with_name(dest.name + ".part")


def backoff(failures: int) -> float:
    return min(BACKOFF_S * 2 ** (failures - 1), BACKOFF_MAX_S)


class _PartFile:
    """The .part on disk."""

    def __init__(self, path: Path):
        self.path = path

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def restart(self) -> None:
        """Empty the .part (the server sends the whole file again)."""
        self.path.write_bytes(b"")


class _Target:
    """What one download asks for: the URL sent (with any secret query), the URL shown, the Authorization header."""

    def __init__(self, url: str, shown: str, authorization: str | None):
        self.url, self.shown, self.authorization = url, shown, authorization


def netrc_authorization(url: str) -> str | None:
    """A basic-auth header value from ~/.netrc (or $NETRC) for the URL's host, or None if it has no entry."""
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(url).hostname or "")
    except (netrc.NetrcParseError, OSError) as err:
        # The message names the file and line, never a password.
        raise DownloadError(f"cannot read the credentials for {redact_url(url)} from {path}: {err}") from None
    if entry is None:
        return None
    login, _, password = entry
    return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode("ascii")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ftp://; only http(s) is allowed, redirected or not."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in SCHEMES:
            raise DownloadError(f"{redact_url(req.full_url)} redirects to {redact_url(newurl)!r}: only http:// and https:// URLs are allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _transfer(opener, target: _Target, part: _PartFile, timeout: float, chunk_size: int, progress: bool, desc: str) -> None:
    """One connection: append what the server sends to the .part; _Retry if it stops short."""
    offset = part.size()
    url = target.shown
    response = _open(opener, target, offset, timeout)
    with response:
        if response.status == 416:
            return _unsatisfiable(response, part, offset)
        total = _expected_total(url, response, part, offset)
        offset = part.size()  # 0 if the server sent the whole file again
        length = _int_header(response, "Content-Length")
        received = 0
        with open(part.path, "ab") as f, tqdm(total=total, initial=offset, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
            while True:
                try:
                    block = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as e:
                    raise _Retry(redact(f"connection lost after {offset + received} bytes: {e!r}")) from e
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
    if length is not None and received < length:
        raise _Retry(f"connection closed after {offset + received} of {offset + length} bytes")


def _open(opener, target: _Target, offset: int, timeout: float):
    """The server's response (416 included); _Retry for what may pass, DownloadError for what will not."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(target.url, headers=headers)
    if target.authorization:
        request.add_unredirected_header("Authorization", target.authorization)  # never sent on to a redirect's host
    url = target.shown
    try:
        return opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return e  # the .part may already be whole: the caller reads Content-Range
        e.close()
        if e.code in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        hint = " (give credentials in ~/.netrc or XFER_DOWNLOAD_QUERY)" if e.code in (401, 403) else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (not retried){hint}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(redact(f"cannot connect: {reason!r}")) from e


def _unsatisfiable(response, part: _PartFile, offset: int) -> None:
    """416 to `Range: bytes=<offset>-`: done if the .part already holds the whole file, else start over."""
    found = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if found and int(found.group(1)) == offset:
        return
    part.restart()
    raise _Retry(f"server cannot resume from byte {offset} (HTTP 416); starting again from the beginning")


def _expected_total(url: str, response, part: _PartFile, offset: int) -> int | None:
    """The whole file's size if the server says it; empties the .part when the reply starts at byte 0."""
    if response.status == 206:
        found = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if found is None or int(found.group(1)) != offset:
            part.restart()
            raise _Retry(f"asked for bytes {offset}- but got Content-Range {response.headers.get('Content-Range')!r}; starting again")
        return None if found.group(3) == "*" else int(found.group(3))
    if response.status == 200:
        if offset:
            part.restart()  # the server ignores Range and sends the whole file
        return _int_header(response, "Content-Length")
    raise DownloadError(f"{url}: unexpected HTTP {response.status} {response.reason} (expected 200, or 206 to a Range request)")


def _int_header(response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None
