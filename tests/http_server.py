"""A local HTTP file server for download tests: honours Range, misbehaves on request, logs everything.

    with serve_directory(root) as server:
        server.drop_after("big.bin", 1000)      # next GET: full Content-Length, 1000 bytes, then hang up
        download(server.url("big.bin"), ...)
        assert server.requests_for("big.bin")[1].range == "bytes=1000-"

Bound to 127.0.0.1 on a free port; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class Request:
    path: str  # without the leading slash: "data.bin"
    range: str | None  # the Range header as sent, e.g. "bytes=1000-"
    status: int
    sent: int  # body bytes actually written


class FileServer:
    """Serves files under `root`; see the module docstring. Use via serve_directory()."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._drops: dict[str, list[int]] = {}  # path -> [bytes to send, times left]
        self._statuses: dict[str, list[int]] = {}  # path -> [status, times left]
        self._ignore_range: set[str] = set()
        self._redirects: dict[str, str] = {}
        self._paces: dict[str, tuple[int, float]] = {}  # path -> (bytes per write, seconds between writes)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # A short poll so stop() returns at once, not after serve_forever's default 0.5 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._stopped = False

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def drop_after(self, name: str, n_bytes: int, times: int = 1) -> None:
        """The next `times` GETs of `name` announce the full length but hang up after n_bytes of body."""
        self._drops[name.lstrip("/")] = [n_bytes, times]

    def fail(self, name: str, status: int, times: int = 1) -> None:
        """The next `times` GETs of `name` answer `status` (e.g. 503) with no body."""
        self._statuses[name.lstrip("/")] = [status, times]

    def redirect(self, name: str, location: str) -> None:
        """GETs of `name` answer 302 to `location` (any URL, any scheme)."""
        self._redirects[name.lstrip("/")] = location

    def pace(self, name: str, chunk: int, delay: float) -> None:
        """GETs of `name` send the body `chunk` bytes at a time, `delay` seconds apart (a slow link)."""
        self._paces[name.lstrip("/")] = (chunk, delay)

    def ignore_range(self, name: str) -> None:
        """GETs of `name` always answer 200 with the whole file, as some servers do."""
        self._ignore_range.add(name.lstrip("/"))

    def requests_for(self, name: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == name.lstrip("/")]

    def _take(self, table: dict[str, list[int]], path: str) -> int | None:
        """The configured value for `path` if it has uses left (one is used up)."""
        with self._lock:
            rule = table.get(path)
            if rule is None or rule[1] <= 0:
                return None
            rule[1] -= 1
            return rule[0]

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (idempotent): a test may stop early to make the port refuse connections."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def do_GET(self):
            path = unquote(urlsplit(self.path).path).lstrip("/")
            range_header = self.headers.get("Range")
            status = server._take(server._statuses, path)
            if status is not None:
                return self._reply_empty(path, range_header, status)
            if path in server._redirects:
                return self._reply_empty(path, range_header, 302, {"Location": server._redirects[path]})
            file = (server.root / path).resolve()
            if not file.is_file() or server.root not in file.parents:
                return self._reply_empty(path, range_header, 404)
            data = file.read_bytes()
            start, status, headers = 0, 200, {}
            found = _RANGE.fullmatch(range_header or "")
            if found and path not in server._ignore_range:
                start = int(found.group(1))
                if start >= len(data):
                    return self._reply_empty(path, range_header, 416, {"Content-Range": f"bytes */{len(data)}"})
                status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            body = data[start:]
            limit = server._take(server._drops, path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            sent = body if limit is None else body[:limit]
            # Logged before the body goes out: the client cannot finish before its request is in the log.
            server._log(Request(path, range_header, status, len(sent)))
            chunk, delay = server._paces.get(path, (len(sent) or 1, 0.0))
            for i in range(0, len(sent), chunk):
                if i:
                    time.sleep(delay)
                try:
                    self.wfile.write(sent[i : i + chunk])
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client hung up
            if limit is not None:
                self.close_connection = True

        def _reply_empty(self, path, range_header, status, headers=None):
            server._log(Request(path, range_header, status, 0))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()

    return Handler


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[FileServer]:
    """A running FileServer for `root`, stopped on exit."""
    server = FileServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
