"""A Prefect server, an MLflow server and the project's deployments, in the background.

    python -m servers.supervisor start  [--root .] [--prefect-port 4200] [--mlflow-port 5000] [--flows-port 4280]
    python -m servers.supervisor stop   [--root .]
    python -m servers.supervisor status [--root .]

`make servers` / `make stop` call this. Every server binds 127.0.0.1 only.
Each runs in its own process group (the servers start worker processes of
their own) with its log, pid file and URL under `<root>/.servers/`:

  prefect   `prefect server start`; its database lives in PREFECT_HOME
            (the Makefile sets `<project>/.prefect`)
  mlflow    `mlflow server` over the project's store: sqlite:///<root>/mlflow.db
            and <root>/mlartifacts, as `make ui` serves it
  flows     `python -m flows.serve`: prefect.yaml's deployments (the weekly
            retrain, the hourly monitor) served for this project against the
            Prefect server above, started once that answers; its health is
            Prefect's runner webserver, on --flows-port

With `export PREFECT_API_URL=http://127.0.0.1:4200/api` every stage (and
`servers/temporary_prefect.py`, hence `make run`) talks to the running Prefect server
instead of starting a temporary one of its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
STATE_DIR = ".servers"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
CODE_ROOT = Path(__file__).resolve().parents[1]
PORT_VARIABLES = {"prefect": "PREFECT_PORT", "mlflow": "UI_PORT", "flows": "FLOWS_PORT"}


class ServerError(RuntimeError):
    """A server could not be started: the message says why and where its log is."""


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    command: list[str]
    health_path: str
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def _bin(tool: str) -> str:
    # The console script installed beside this interpreter (the venv's), so the
    # servers run the pinned versions whatever PATH says.
    return str(Path(sys.executable).with_name(tool))


def prefect_server(root: Path, port: int) -> Server:
    home = os.environ.get("PREFECT_HOME") or str(root / ".prefect")
    env = {
        "PREFECT_HOME": home,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        # The UI asks this URL for its data; left unset it names the default
        # port 4200, whatever --port says.
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    command = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return Server("prefect", port, command, "/api/health", env)


def mlflow_server(root: Path, port: int) -> Server:
    env = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Job execution starts a job runner and seven huey consumers (GenAI
        # judges); the pipeline uses none, and on 2 cores they slow the start.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        _bin("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root", str(root / "mlartifacts"),
        "--host", HOST, "--port", str(port),
        "--workers", "1",  # the default 4 workers took ~25 s to answer on 2 cores
    ]  # fmt: skip
    return Server("mlflow", port, command, "/health", env)


def flows_server(root: Path, port: int, prefect_port: int) -> Server:
    env = {
        "PREFECT_HOME": os.environ.get("PREFECT_HOME") or str(root / ".prefect"),
        "PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
        "PREFECT_RUNNER_SERVER_ENABLE": "true",
        "PREFECT_RUNNER_SERVER_HOST": HOST,
        "PREFECT_RUNNER_SERVER_PORT": str(port),
        "DO_NOT_TRACK": "true",
        # The code beside this file (the checkout), serving the project at root.
        "PYTHONPATH": os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    command = [sys.executable, "-m", "flows.serve", "--root", str(root)]
    return Server("flows", port, command, "/health", env)


def servers(root: Path, prefect_port: int = 4200, mlflow_port: int = 5000, flows_port: int = 4280) -> list[Server]:
    """In start order: the flows server needs the Prefect server answering first."""
    root = root.resolve()
    return [prefect_server(root, prefect_port), mlflow_server(root, mlflow_port), flows_server(root, flows_port, prefect_port)]


SERVER_NAMES = ("prefect", "mlflow", "flows")


# -- pid files and process groups -------------------------------------------


def _state(root: Path, name: str, suffix: str) -> Path:
    return root.resolve() / STATE_DIR / f"{name}.{suffix}"


def read_pid(root: Path, name: str) -> int | None:
    try:
        return int(_state(root, name, "pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, from /proc.

    A zombie is not counted: nothing here may reap an orphaned server (PID 1
    of a container often does not), and a zombie holds no port or file.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the command name, which may itself hold spaces and ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def running_pid(root: Path, name: str) -> int | None:
    """The pid from `name`'s pid file if its process group still runs, else None.

    A pid file left by a crash or a reboot may name a pid reused by another
    program: the group must still hold a process whose command line names
    the server.
    """
    pid = read_pid(root, name)
    if pid is None:
        return None
    for member in group_members(pid):
        try:
            cmdline = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if name in cmdline:
            return pid
    return None


def _read_url(root: Path, server: Server) -> str:
    try:
        return _state(root, server.name, "url").read_text().strip()
    except FileNotFoundError:
        return server.url


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _healthy(server: Server) -> bool:
    try:
        with urllib.request.urlopen(server.url + server.health_path, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


# -- start / stop / status ----------------------------------------------------


def _spawn(root: Path, server: Server) -> subprocess.Popen:
    if not _port_free(server.port):
        raise ServerError(
            f"{server.name}: port {server.port} on {HOST} is taken by another program "
            f"(not one this project started); choose another port "
            f"({PORT_VARIABLES[server.name]}=... with make)"
        )
    log = _state(root, server.name, "log")
    # A Prefect server is the API: it must not point at another; the flows server names its own.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | server.env
    with open(log, "ab") as out:
        # A new session: the server and the workers it starts share one process
        # group, which stop() signals as a whole.
        proc = subprocess.Popen(
            server.command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    _state(root, server.name, "pid").write_text(f"{proc.pid}\n")
    _state(root, server.name, "url").write_text(f"{server.url}\n")
    return proc


def _ended(proc: subprocess.Popen) -> str:
    """How a server process ended, from its exit status (a negative status is the signal that killed it)."""
    code = proc.returncode
    if code < 0:
        return f"was killed by {signal.Signals(-code).name} while starting (not by this supervisor)"
    return f"exited with status {code} while starting"


def _wait_healthy(root: Path, pending: dict[str, tuple[Server, subprocess.Popen]], timeout: float) -> None:
    """Wait until every server in `pending` (name -> (server, the process this call started)) answers.

    A server's death is read from its own process handle, not from /proc: the
    exit status says whether it exited or which signal killed it.
    """
    pending = dict(pending)
    deadline = time.monotonic() + timeout
    while pending:
        for name, (server, proc) in list(pending.items()):
            if _healthy(server):
                del pending[name]
            elif proc.poll() is not None:
                log = _state(root, name, "log")
                raise ServerError(f"{name} {_ended(proc)}; the end of {log}:\n{_log_tail(log)}")
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            raise ServerError(f"{names} did not answer within {timeout:.0f} s; logs in {root / STATE_DIR}")
        time.sleep(0.25)


def start(root: Path, prefect_port: int = 4200, mlflow_port: int = 5000, flows_port: int = 4280, timeout: float = START_TIMEOUT_S) -> dict[str, str]:
    """Start whichever server is not running yet; wait until all answer. Returns name -> URL."""
    root = root.resolve()
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    urls: dict[str, str] = {}
    started: dict[str, tuple[Server, subprocess.Popen]] = {}
    try:
        for server in servers(root, prefect_port, mlflow_port, flows_port):
            if server.name == "flows":  # it registers its deployments with the Prefect server: that must answer first
                _wait_healthy(root, started, timeout)
            pid = running_pid(root, server.name)
            if pid is not None:
                urls[server.name] = _read_url(root, server)
                print(f"{server.name} is already running (pid {pid}) at {urls[server.name]}: not starting another")
                continue
            proc = _spawn(root, server)
            print(f"{server.name}: started (pid {proc.pid}), log {_state(root, server.name, 'log')}")
            urls[server.name] = server.url
            started[server.name] = (server, proc)
        _wait_healthy(root, started, timeout)
    except BaseException:
        # Leave nothing half-started behind: stop what this call started.
        for name in started:
            _stop_one(root, name)
        raise
    return urls


def _stop_one(root: Path, name: str) -> str:
    pid_file = _state(root, name, "pid")
    pid = running_pid(root, name)
    if pid is None:
        stale = pid_file.exists()
        pid_file.unlink(missing_ok=True)
        _state(root, name, "url").unlink(missing_ok=True)
        return f"{name}: not running" + (" (removed a stale pid file)" if stale else "")
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    forced = bool(group_members(pid))
    if forced:  # SIGTERM ignored for too long: no server may outlive `make stop`
        os.killpg(pid, signal.SIGKILL)
        while group_members(pid):
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    _state(root, name, "url").unlink(missing_ok=True)
    return f"{name}: stopped (pid {pid}{', killed after SIGTERM timed out' if forced else ''})"


def stop(root: Path) -> list[str]:
    """Stop every server (each whole process group; the flows server first) and remove their pid files."""
    return [_stop_one(root.resolve(), name) for name in reversed(SERVER_NAMES)]


def status(root: Path) -> dict[str, int | None]:
    """name -> pid of the running server, or None."""
    return {name: running_pid(root.resolve(), name) for name in SERVER_NAMES}


def _declared() -> list[dict]:
    import yaml

    return (yaml.safe_load((CODE_ROOT / "prefect.yaml").read_text()) or {}).get("deployments", [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project (default: .)")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--flows-port", type=int, default=4280, help="the flows server's health endpoint (Prefect's runner webserver)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        print("\n".join(stop(args.root)))
        return 0
    if args.action == "status":
        for name, pid in status(args.root).items():
            print(f"{name}: {'running (pid %d)' % pid if pid else 'not running'}")
        return 0
    try:
        urls = start(args.root, args.prefect_port, args.mlflow_port, args.flows_port)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"\nPrefect UI  {urls['prefect']}\nMLflow UI   {urls['mlflow']}")
    names = ", ".join(f"{d['name']} ({d['entrypoint']})" for d in _declared())
    print(f"Deployments served for this project: {names}; log {_state(args.root.resolve(), 'flows', 'log')}")
    print("\nTo run stages against this Prefect server instead of a temporary one each:")
    print(f"  export PREFECT_API_URL={urls['prefect']}/api")
    print("Stop them all with `make stop`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
