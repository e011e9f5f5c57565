"""download(): verified, atomic, resumable, against a local misbehaving HTTP server (offline)."""

from __future__ import annotations

import hashlib
import os

import pytest
from http_server import serve_directory

from xfer.data import download as download_module
from xfer.data.download import ChecksumError, DownloadError, download, part_path

SIZE = 300_000


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """Reconnect at once: the tests check what is asked for, not how long it waits."""
    monkeypatch.setattr(download_module, "BACKOFF_S", 0.0)


@pytest.fixture
def served(tmp_path):
    """(server, the served file's bytes, its sha256, a downloads folder)."""
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "data.bin").write_bytes(data)
    with serve_directory(root) as server:
        yield server, data, hashlib.sha256(data).hexdigest(), tmp_path / "downloads"


def fetch(server, dest, sha, **kw):
    kw.setdefault("progress", False)
    return download(server.url("data.bin"), dest, sha, **kw)


def test_download_verifies_publishes_and_skips_the_network_when_present(served):
    server, data, sha, downloads = served
    dest = downloads / "data.bin"
    assert fetch(server, dest, sha) == dest
    assert dest.read_bytes() == data
    assert sorted(p.name for p in downloads.iterdir()) == ["data.bin"]
    assert [(r.range, r.status, r.sent) for r in server.requests] == [(None, 200, SIZE)]
    fetch(server, dest, sha.upper())  # upper-case hex is the same digest
    assert len(server.requests) == 1


def test_a_wrong_dest_already_there_is_replaced(served):
    server, data, sha, downloads = served
    dest = downloads / "data.bin"
    downloads.mkdir()
    dest.write_bytes(b"stale")
    fetch(server, dest, sha)
    assert dest.read_bytes() == data


def test_a_dropped_connection_resumes_with_a_range_request(served):
    server, data, sha, downloads = served
    server.drop_after("data.bin", 100_000)
    dest = fetch(server, downloads / "data.bin", sha, chunk_size=4096)
    assert dest.read_bytes() == data
    assert [(r.range, r.status, r.sent) for r in server.requests] == [(None, 200, 100_000), ("bytes=100000-", 206, SIZE - 100_000)]
    assert not part_path(dest).exists()


def test_a_part_left_by_a_failed_call_is_resumed_and_checked_from_disk(served):
    server, data, sha, downloads = served
    dest = downloads / "data.bin"
    server.drop_after("data.bin", 70_000, times=2)
    with pytest.raises(DownloadError, match="failed 2 times") as failure:
        fetch(server, dest, sha, attempts=2)
    assert str(part_path(dest)) in str(failure.value)
    assert not dest.exists() and part_path(dest).read_bytes() == data[:140_000]
    fetch(server, dest, sha)
    assert dest.read_bytes() == data
    last = server.requests[-1]
    assert (last.range, last.status, last.sent) == ("bytes=140000-", 206, SIZE - 140_000)
    assert len(server.requests) == 3


def test_a_whole_part_left_behind_is_published_without_downloading_it_again(served):
    server, data, sha, downloads = served
    dest = downloads / "data.bin"
    downloads.mkdir()
    part_path(dest).write_bytes(data)
    fetch(server, dest, sha)
    assert dest.read_bytes() == data
    assert [(r.range, r.status, r.sent) for r in server.requests] == [(f"bytes={SIZE}-", 416, 0)]


def test_a_server_that_ignores_range_still_gives_the_right_file(served):
    server, data, sha, downloads = served
    server.ignore_range("data.bin")
    server.drop_after("data.bin", 50_000)
    dest = fetch(server, downloads / "data.bin", sha)
    assert dest.read_bytes() == data
    assert [(r.range, r.status, r.sent) for r in server.requests] == [(None, 200, 50_000), ("bytes=50000-", 200, SIZE)]


def test_a_resumed_part_with_wrong_bytes_fails_the_checksum_then_starts_clean(served):
    server, data, sha, downloads = served
    dest = downloads / "data.bin"
    downloads.mkdir()
    part_path(dest).write_bytes(b"\0" * 1000)  # not the file's first 1000 bytes
    with pytest.raises(ChecksumError):
        fetch(server, dest, sha)
    assert not part_path(dest).exists()
    fetch(server, dest, sha)
    assert dest.read_bytes() == data


def test_a_checksum_mismatch_names_both_digests_and_keeps_the_earlier_copy(served):
    server, data, sha, downloads = served
    dest = downloads / "data.bin"
    downloads.mkdir()
    dest.write_bytes(b"an earlier good copy")
    wrong = "ab" * 32
    with pytest.raises(ChecksumError) as failure:
        fetch(server, dest, wrong)
    message = str(failure.value)
    assert wrong in message and sha in message and server.url("data.bin") in message
    assert dest.read_bytes() == b"an earlier good copy"
    assert sorted(p.name for p in downloads.iterdir()) == ["data.bin"]


def test_not_found_fails_at_once_without_retrying(served):
    server, _, sha, downloads = served
    url = server.url("missing.bin")
    with pytest.raises(DownloadError, match="404") as failure:
        download(url, downloads / "missing.bin", sha, progress=False, attempts=5)
    assert url in str(failure.value)
    assert len(server.requests) == 1
    assert not part_path(downloads / "missing.bin").exists()


def test_a_busy_server_is_asked_again(served):
    server, data, sha, downloads = served
    server.fail("data.bin", 503, times=2)
    assert fetch(server, downloads / "data.bin", sha).read_bytes() == data
    assert [r.status for r in server.requests] == [503, 503, 200]


def test_all_attempts_failing_raises_download_error(served):
    server, data, sha, downloads = served
    server.fail("data.bin", 503, times=10)
    with pytest.raises(DownloadError, match="failed 3 times"):
        fetch(server, downloads / "data.bin", sha, attempts=3)
    assert len(server.requests) == 3
    # Nothing listens on a closed port: connection refused is retried, then reported.
    port = server.port
    server.stop()
    with pytest.raises(DownloadError, match="failed 2 times"):
        download(f"http://127.0.0.1:{port}/data.bin", downloads / "data.bin", sha, progress=False, attempts=2, timeout=2)


def test_redirects_are_followed_to_http_only(served):
    server, data, sha, downloads = served
    server.redirect("moved.bin", server.url("data.bin"))
    assert download(server.url("moved.bin"), downloads / "a.bin", sha, progress=False).read_bytes() == data
    server.redirect("ftp.bin", "ftp://127.0.0.1/data.bin")
    with pytest.raises(DownloadError, match="only http:// and https://"):
        download(server.url("ftp.bin"), downloads / "b.bin", sha, progress=False)
    assert [r.status for r in server.requests_for("ftp.bin")] == [302]


def test_no_sha256_publishes_without_a_check(served):
    server, data, _, downloads = served
    dest = fetch(server, downloads / "data.bin", None)
    assert dest.read_bytes() == data


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "a" * 63, "a" * 65])
def test_a_malformed_sha256_is_refused_before_any_request(served, bad):
    server, _, _, downloads = served
    with pytest.raises(ValueError, match=repr(bad)):
        fetch(server, downloads / "data.bin", bad)
    assert server.requests == [] and not downloads.exists()


@pytest.mark.parametrize("url", ["ftp://example.org/x.zip", "file:///etc/passwd", "data.zip", "http:///nohost"])
def test_only_http_urls_are_downloaded(tmp_path, url):
    with pytest.raises(ValueError, match="only http:// and https://") as failure:
        download(url, tmp_path / "x", None, progress=False)
    assert url in str(failure.value)


def test_progress_bar_shows_bytes_and_can_be_turned_off(served, capsys):
    server, _, sha, downloads = served
    fetch(server, downloads / "quiet.bin", sha, progress=False)
    assert capsys.readouterr().err == ""
    fetch(server, downloads / "loud.bin", sha, progress=True)
    assert "300k/300k" in capsys.readouterr().err
