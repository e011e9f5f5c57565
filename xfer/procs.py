"""Child processes that die with the stage, and whether a recorded process still lives.

A stage killed by SIGKILL (the OOM killer, `kill -9`) runs no cleanup: its
children (torchrun and its workers, a temporary Prefect server, a local
cluster) would be re-parented to init and keep running, and keep writing.
`lifeline()` is a `preexec_fn` that asks Linux to SIGKILL the child when the
thread that started it dies (prctl PR_SET_PDEATHSIG); `owner_env()` /
`check_owner()` let a grandchild (a torchrun worker) refuse to write once the
stage that started the job is gone. `process_identity()` / `is_dead()` record
and test a process by host, pid and start time, so a reused pid is not taken
for the one that was recorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1
# "<pid>:<start time>" of the stage process that started a job, for its workers.
OWNER_ENV = "XFER_OWNER"

# Loaded in the parent: a preexec_fn runs between fork and exec, no place for dlopen.
try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None


class OwnerGone(RuntimeError):
    """The stage process that started this job has died: nothing may be written for it any more."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send this process `sig` when its parent (thread) dies; False where unsupported."""
    if _LIBC is None:
        return False
    return _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def lifeline(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when this process dies.

    The signal follows the *thread* that forks: start long-lived children from
    the main thread. If the parent died between fork and prctl, the child kills
    itself at once.
    """
    parent = os.getpid()

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def start_time(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # Fields after the command name start at field 3 (state); start time is field 22.
    return fields[19] if len(fields) > 19 else None


def process_identity(pid: int | None = None) -> dict[str, str]:
    """host, pid and start time of `pid` (default: this process), as strings for tags."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": str(pid), "start": start_time(pid) or ""}


def is_dead(host: str | None, pid: str | int | None, start: str | None) -> bool:
    """True only when the recorded process certainly no longer runs.

    It must have been recorded on this host (a process elsewhere cannot be
    checked) with a pid; it is dead if that pid is gone or now belongs to a
    process started at another time.
    """
    if not host or host != socket.gethostname() or not str(pid or "").isdigit():
        return False
    now = start_time(int(pid))
    if now is None:
        return True
    return bool(start) and now != start


def owner_env() -> dict[str, str]:
    """Environment naming this process as the owner of a job's workers."""
    me = process_identity()
    return {OWNER_ENV: f"{me['pid']}:{me['start']}"}


def check_owner(what: str = "write") -> None:
    """Raise OwnerGone if the process OWNER_ENV names has died (no-op when it is unset)."""
    value = os.environ.get(OWNER_ENV)
    if not value:
        return
    pid, _, start = value.partition(":")
    if is_dead(socket.gethostname(), pid, start):
        raise OwnerGone(f"the stage process {pid} that started this job has died: not going to {what}")


# `<prefix><host>-<pid>-<start>-<8 random>`: a temporary folder that names the process using it.
_OWNED = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d*)-[a-z0-9_]{8}$")


@contextlib.contextmanager
def owned_tempdir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A temporary folder in `parent` whose name records this process; removed when the block ends.

    A process killed inside the block (SIGKILL runs no cleanup) leaves the folder
    behind: remove_orphaned_tempdirs(parent, prefix) removes it on the next run,
    and never the folder of a process that still lives.
    """
    me = process_identity()
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{me['host']}-{me['pid']}-{me['start']}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_tempdirs(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the owned_tempdir folders in `parent` whose process has died (is_dead); return them.

    A folder named otherwise (an older xfer's, another host's) is left alone.
    """
    removed = []
    for path in sorted(Path(parent).glob(f"{prefix}*")) if Path(parent).is_dir() else []:
        owner = _OWNED.match(path.name[len(prefix) :])
        if owner and path.is_dir() and not path.is_symlink() and is_dead(owner["host"], owner["pid"], owner["start"]):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
