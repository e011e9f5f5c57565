"""Exclusive file locks between processes (fcntl.flock): one project run, one promotion, one download at a time.

The kernel releases a lock when its holder dies, however it dies (SIGKILL
included): a lock file left behind is not a lock held, and is never deleted
(deleting a lock file lets two processes each lock a different file of the
same name). Locks are reentrant within a process: a pipeline that holds its
project's lock runs its stages, which take it again, without waiting on itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from xfer.layout import Layout

_PID_WIDTH = 12  # the holder's pid, right-aligned: rewritten in place, never truncated
_held: dict[str, list[int]] = {}  # lock file -> [fd, depth], in this process
_held_guard = threading.Lock()


class LockedError(RuntimeError):
    """Another process holds the lock; the message names the holder's pid when the lock file records it."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


def holder_pid(path: Path) -> int | None:
    """The pid the lock file at `path` records (its last holder), or None."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def file_lock(
    path: str | Path, *, wait: bool = True, busy: Callable[[int | None], str] | None = None, on_wait: Callable[[int | None], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) until the block ends.

    wait=False: raise LockedError(busy(pid)) at once if another process holds it.
    wait=True: block until it is free, first calling on_wait(pid) if it is not.
    The holder's pid is written into the file, for the messages of those who wait.
    """
    path = Path(os.path.realpath(path))  # one key for `.`, `./x/..` and the absolute path
    key = str(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(path)
            if not wait:
                raise LockedError(busy(pid) if busy else f"{path} is locked by another process (pid {pid or 'unknown'})", pid) from None
            if on_wait is not None:
                on_wait(pid)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, f"{os.getpid():>{_PID_WIDTH}}\n".encode(), 0)
        with _held_guard:
            _held[key] = [fd, 1]
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked_file(path: str | Path, on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on the file `path` itself (created empty if missing), waiting for it if need be.

    For a file that is renamed or deleted when its holder is done (a
    download's .part): a waiter that then gets the lock of the old file
    opens the new one and locks that instead. Nothing is written into it.
    """
    path = Path(path)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                continue  # renamed or deleted by the holder we waited for
            if not _same_file(fd, current):
                continue  # replaced by a new file of that name: lock that one
            yield path
            return
        finally:
            os.close(fd)


def _same_file(fd: int, st: os.stat_result) -> bool:
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def project_lock(root: str | Path) -> contextlib.AbstractContextManager[None]:
    """One run of the project at `root` at a time: a stage process, the pipeline flow, a `dvc repro` stage.

    Taken without waiting: a second run fails at once with LockedError naming
    the running one's pid, before it writes anything. `dvc repro` runs each
    stage as its own process, so a pipeline started while it runs stops that
    `dvc repro` at its next stage, or is stopped itself, never both running.
    """
    lock = Path(os.path.realpath(Layout(Path(root)).run_lock))

    def busy(pid: int | None) -> str:
        return (
            f"another run of this project is in progress (pid {pid or 'unknown'}): {lock} is locked until it ends; "
            "wait for it to finish (or stop it), then run again"
        )

    return file_lock(lock, wait=False, busy=busy)
