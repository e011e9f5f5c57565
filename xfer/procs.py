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

import ctypes
import os
import signal
import socket
import sys
from typing import Callable

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
