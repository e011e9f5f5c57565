"""Prefect's temporary server, tied to the process that starts it.

A temporary server started here dies with its process, even one killed by
SIGKILL (Linux's parent-death signal, xfer/procs.py): never left running,
orphaned to init. Used by a stage process (flows/stages.py) and by
`python -m servers.temporary_prefect` (make run).
"""

from __future__ import annotations

import threading

import tasks  # noqa: F401  (offline defaults before prefect is imported)
from xfer.procs import lifeline


class _TiedSubprocess:
    """The `subprocess` module as Prefect's server module sees it: Popen from the main thread gets a lifeline."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def Popen(self, *args, **kwargs):  # noqa: N802  (subprocess's name)
        # The parent-death signal follows the thread that forks: only the main thread lives as long as the process.
        if threading.current_thread() is threading.main_thread() and kwargs.get("preexec_fn") is None:
            kwargs["preexec_fn"] = lifeline()
        return self._module.Popen(*args, **kwargs)


def tie_to_this_process() -> None:
    """Temporary Prefect servers started from this process's main thread die with it (SIGKILL on its death)."""
    import prefect.server.api.server as server_module

    if not isinstance(server_module.subprocess, _TiedSubprocess):
        server_module.subprocess = _TiedSubprocess(server_module.subprocess)


def start_temporary_server() -> str | None:
    """Start Prefect's temporary server now, from the main thread and tied to this process.

    Without it, Prefect starts the same server on first use, from whichever
    thread asks first, and it outlives a killed process. Returns its API URL,
    or None when PREFECT_API_URL names a server (nothing is started).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    tie_to_this_process()
    server = SubprocessASGIServer()
    server.start()
    return server.api_url
