"""Which addresses each server the project starts listens on, read from /proc/net/tcp{,6}.

    python benchmarks/binds.py [--only mlflow_ui,servers,...]

Starts each for real, as the project starts it, on this machine, finds every
TCP socket in LISTEN state that the started process or any of its
descendants holds (socket inodes of /proc/<pid>/fd against /proc/net/tcp and
tcp6), prints them, and stops it. docs/security.md states the results.

  mlflow_ui          `make ui`'s command line (from the Makefile)
  servers            `make servers`: servers/supervisor.py start (Prefect + MLflow + the deployments served)
  temporary_prefect  servers/temporary_prefect.py (Prefect's SubprocessASGIServer)
  stage_prefect      a stage process without PREFECT_API_URL: its temporary server
  model_server       `mlflow models serve` as the README runs it, and without --host
  torchrun           tasks/finetune.py launch_workers' command, workers replaced by a sleep
  dask               tasks/runners.py's local Dask cluster (its cluster_kwargs)
  ray                tasks/runners.py's local Ray instance (shard_runner, its init_kwargs)

Linux only. Needs the dask and ray extras for the last two.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
BIN = Path(sys.executable).parent
ENV = {**os.environ, "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}
ENV.pop("PREFECT_API_URL", None)


def _listen_table() -> dict[str, str]:
    """socket inode -> "address:port" for every TCP socket in LISTEN state."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in open(name).read().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A":
                continue
            addr, port = local.split(":")
            raw = bytes.fromhex(addr)
            if len(raw) == 4:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                host = "[" + socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))) + "]"
            table[inode] = f"{host}:{int(port, 16)}"
    return table


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


def listeners(pid: int) -> dict[str, str]:
    """ "address:port" -> process name, for every listening socket of `pid` and its descendants."""
    table, out = _listen_table(), {}
    for p in descendants(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
            comm = open(f"/proc/{p}/comm").read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m.group(1) in table:
                out[table[m.group(1)]] = comm
    return out


def probe(command: list[str], wait_for: int = 1, timeout: float = 120.0, env: dict | None = None) -> dict[str, str]:
    """Start `command` in its own group, wait until its tree listens on >= wait_for sockets (and 3 s more), read, kill."""
    proc = subprocess.Popen(command, env=env or ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, found = time.monotonic() + timeout, {}
        while time.monotonic() < deadline and proc.poll() is None:
            found = listeners(proc.pid)
            if len(found) >= wait_for:
                time.sleep(3)
                return listeners(proc.pid)
            time.sleep(0.5)
        return found
    finally:
        # Its whole tree: torchrun puts its workers, and Ray its workers, in process groups of their own.
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree - {proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def mlflow_ui(tmp: Path) -> dict:
    make = (REPO / "Makefile").read_text()
    line = re.search(r"^ui:.*\n\t(.*)$", make, re.M).group(1)
    line = line.replace("$(BIN)/", str(BIN) + "/").replace("$(abspath $(STORE))", str(tmp)).replace("$(UI_PORT)", str(free())).replace("$(CURDIR)", str(tmp))
    return probe(line.split())


def servers(tmp: Path) -> dict:
    code = (
        "import sys, time; from servers import supervisor; "
        f"sys.exit(supervisor.main(['start', '--root', {str(tmp)!r}, '--prefect-port', '{free()}', '--mlflow-port', '{free()}', '--flows-port', '{free()}']))"
    )
    done = subprocess.run(_py(code), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    try:
        if done.returncode != 0:
            raise RuntimeError(f"supervisor start exited {done.returncode}: {done.stdout[-500:]} {done.stderr[-1500:]}")
        found = {}
        for pidfile in (tmp / ".servers").glob("*.pid"):
            found.update(listeners(int(pidfile.read_text().split()[0])))
        return found
    finally:
        subprocess.run(
            _py(f"from servers import supervisor; supervisor.main(['stop', '--root', {str(tmp)!r}])"), env=ENV, cwd=REPO, capture_output=True, timeout=120
        )


def temporary_prefect(tmp: Path) -> dict:
    return probe([sys.executable, "-m", "servers.temporary_prefect", "sleep", "600"], env={**ENV, "PREFECT_HOME": str(tmp)})


def stage_prefect(tmp: Path) -> dict:
    # What a stage process does with no PREFECT_API_URL: Prefect starts its own temporary server.
    code = "import tasks; from prefect import flow\n@flow\ndef f():\n    import time; time.sleep(600)\nf()"
    return probe(_py(code), env={**ENV, "PREFECT_HOME": str(tmp)})


def model_server(tmp: Path) -> dict:
    model = tmp / "model"
    code = (
        "import mlflow.pyfunc\nclass M(mlflow.pyfunc.PythonModel):\n    def predict(self, context, model_input):\n        return model_input\n"
        f"mlflow.pyfunc.save_model({str(model)!r}, python_model=M())"
    )
    subprocess.run(_py(code), env=ENV, check=True, capture_output=True, timeout=300)
    base = [str(BIN / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local", "--workers", "1"]
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_HOST"}
    return {
        "as the README runs it (--host 127.0.0.1)": probe(base + ["--host", "127.0.0.1", "--port", str(free())], env=env),
        "without --host": probe(base + ["--port", str(free())], env=env),
    }


def torchrun(tmp: Path) -> dict:
    import subprocess as sp

    import tasks.finetune as ft
    from xfer.layout import Layout

    seen = {}
    real_run = sp.run
    sp.run = lambda command, **kw: seen.setdefault("command", command)
    try:
        ft.launch_workers(Layout(tmp), 1)
    finally:
        sp.run = real_run
    command = seen["command"]
    cut = len(command) - 1 - command[::-1].index("-m")  # the worker module: replaced by a sleeping script
    sleeper = tmp / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    return probe(command[:cut] + [str(sleeper)], env={**ENV, "OMP_NUM_THREADS": "1"})


def dask(tmp: Path) -> dict:
    code = (
        "from tasks.runners import task_runner\nfrom xfer.config import RunnerConfig\n"
        "r = task_runner(RunnerConfig(kind='dask', workers=1))\n"
        "import distributed, time\nc = distributed.LocalCluster(**r.cluster_kwargs)\ntime.sleep(600)\n"
    )
    return probe(_py(code), wait_for=3)


def ray(tmp: Path) -> dict:
    code = (
        "from tasks.runners import shard_runner\nfrom xfer.config import RunnerConfig\n"
        "import ray, time\nwith shard_runner(RunnerConfig(kind='ray', workers=1)) as r:\n"
        "    ray.init(**r.init_kwargs)\n    time.sleep(600)\n"
    )
    return probe(_py(code), wait_for=4, timeout=180)


def free() -> int:
    from helpers import free_port

    return free_port()


PROBES = {f.__name__: f for f in (mlflow_ui, servers, temporary_prefect, stage_prefect, model_server, torchrun, dask, ray)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PROBES), help=f"comma-separated, of: {', '.join(PROBES)}")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in PROBES]
    if bad:
        parser.error(f"--only {args.only!r}: unknown {bad}; valid: {', '.join(PROBES)}")
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"xfer-binds-{name}-") as tmp:
            try:
                found = PROBES[name](Path(tmp))
            except Exception as e:  # noqa: BLE001  (report and go on to the next server)
                found = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {found}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
