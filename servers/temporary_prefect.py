"""Run a command with one temporary Prefect server shared by all its flows.

    python -m servers.temporary_prefect dvc repro

Without a server to talk to, every `python -m flows.stages ...` process that
`dvc repro` starts spins up a temporary Prefect server of its own (seconds
each; the README's Servers section has measured figures). This starts one on 127.0.0.1, points the command at it through
PREFECT_API_URL, and stops it when the command ends. If PREFECT_API_URL is
already set, the command runs against that server unchanged.

A temporary server dies with the process that started it, even one killed by
SIGKILL (`tie_to_this_process`): it is never left running, orphaned to init.
"""

from __future__ import annotations

import os
import subprocess
import sys

import tasks  # noqa: F401  (offline defaults before prefect is imported)
from tasks.prefect_server import tie_to_this_process


def main(argv: list[str] | None = None) -> int:
    command = sys.argv[1:] if argv is None else argv
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.call(command)
    from prefect.server.api.server import SubprocessASGIServer

    tie_to_this_process()
    server = SubprocessASGIServer()
    server.start(timeout=120)
    try:
        return subprocess.call(command, env={**os.environ, "PREFECT_API_URL": server.api_url})
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
