"""`make servers` / `make stop`: a real Prefect and MLflow server for a project, and its deployments served.

One set of servers is started for the module; the last test stops them and
checks nothing is left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, TINY_PARAMS, free_port, listening_addresses, write_params

from servers import supervisor


def make(target: str, root: Path, env: dict, **variables) -> subprocess.CompletedProcess:
    args = [f"{k}={v}" for k, v in variables.items()]
    cmd = ["make", "--no-print-directory", target, f"STORE={root}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def api(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """`make servers` on free ports for an empty project: (root, env, ports, output)."""
    root = tmp_path_factory.mktemp("servers")
    # The server's database goes to this project's PREFECT_HOME, never the suite's.
    env = {**os.environ, "PREFECT_HOME": str(root / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    ports = {"prefect": free_port(), "mlflow": free_port(), "flows": free_port()}
    proc = make("servers", root, env, PREFECT_PORT=ports["prefect"], UI_PORT=ports["mlflow"], FLOWS_PORT=ports["flows"])
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield root, env, ports, proc.stdout
    finally:
        make("stop", root, env)  # idempotent: the last test has usually stopped them


def test_start_prints_urls_and_the_export_line(started):
    root, _, ports, out = started
    assert f"Prefect UI  http://127.0.0.1:{ports['prefect']}" in out
    assert f"MLflow UI   http://127.0.0.1:{ports['mlflow']}" in out
    assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['prefect']}/api" in out
    for name in ("prefect", "mlflow", "flows"):
        assert (root / ".servers" / f"{name}.pid").is_file()
        assert (root / ".servers" / f"{name}.log").is_file()
    assert api(f"http://127.0.0.1:{ports['prefect']}/api/health") is True
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['mlflow']}/health", timeout=10) as resp:
        assert resp.read() == b"OK"
    assert "Deployments served for this project: weekly (flows/retrain.py:retrain), monitor (flows/monitor.py:monitor)" in out


def test_the_deployments_of_prefect_yaml_are_served_for_the_project(started):
    """The loop's two deployments, as prefect.yaml declares them, with the project as their root:
    the monitor can start the retrain by name without a work pool or a worker."""
    import yaml

    root, _, ports, _ = started
    api_url = f"http://127.0.0.1:{ports['prefect']}/api"
    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    served = {d["name"]: d for d in api(api_url + "/deployments/filter", {})}
    assert set(served) == set(declared) == {"weekly", "monitor"}
    flows = {f["id"]: f["name"] for f in api(api_url + "/flows/filter", {})}
    assert {name: flows[d["flow_id"]] for name, d in served.items()} == {"weekly": "xfer-retrain", "monitor": "xfer-monitor"}
    for name, deployment in served.items():
        assert deployment["parameters"] == {**declared[name]["parameters"], "root": str(root.resolve())}
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [s["cron"] for s in declared[name]["schedules"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['flows']}/health", timeout=10) as resp:
        assert resp.status == 200


def test_servers_listen_on_loopback_only(started):
    _, _, ports, _ = started
    assert listening_addresses(ports["prefect"]) == {"127.0.0.1"}
    assert listening_addresses(ports["mlflow"]) == {"127.0.0.1"}
    assert listening_addresses(ports["flows"]) == {"127.0.0.1"}


def test_second_start_starts_no_copy(started):
    root, env, ports, _ = started
    before = supervisor.status(root)
    proc = make("servers", root, env, PREFECT_PORT=ports["prefect"], UI_PORT=ports["mlflow"], FLOWS_PORT=ports["flows"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("prefect", "mlflow", "flows"):
        assert f"{name} is already running (pid {before[name]})" in proc.stdout
    assert "started" not in proc.stdout
    assert supervisor.status(root) == before
    # One server process per kind on the machine for this project.
    cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if _readable(p)]
    assert sum(f"--port {ports['prefect']}".encode() in c.replace(b"\0", b" ") for c in cmdlines) == 1


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


def test_a_stage_with_prefect_api_url_runs_in_that_server(started, tmp_path):
    """The fetch stage, as dvc runs it, records its flow run in the running server."""
    _, env, ports, _ = started
    api_url = f"http://127.0.0.1:{ports['prefect']}/api"
    write_params(tmp_path, TINY_PARAMS)
    stage_env = {**env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / ".prefect"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flows.stages", "fetch"], cwd=tmp_path, env=stage_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The served deployments' schedules add scheduled runs of their own flows: only the stage's here.
    runs = api(api_url + "/flow_runs/filter", {"flows": {"name": {"any_": ["fetch"]}}})
    assert len(runs) == 1, runs
    flow = api(f"{api_url}/flows/{runs[0]['flow_id']}")
    assert flow["name"] == "fetch"
    assert runs[0]["state_type"] == "COMPLETED"
    # A stage that had started a temporary server of its own would not be here,
    # and would have left that server's database in its own PREFECT_HOME.
    assert not (tmp_path / ".prefect" / "prefect.db").exists()


def test_start_refuses_a_port_another_program_holds(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "servers.supervisor", "start", "--root", str(tmp_path), "--prefect-port", str(port), "--mlflow-port", str(free_port())],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken by another program" in proc.stderr
    assert supervisor.status(tmp_path) == {"prefect": None, "mlflow": None, "flows": None}
    assert not list((tmp_path / ".servers").glob("*.pid"))


def test_stop_ignores_a_stale_pid_file_naming_another_program(tmp_path):
    """A pid file whose pid now belongs to another program: stop removes it, kills nothing."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / ".servers").mkdir()
        (tmp_path / ".servers" / "prefect.pid").write_text(f"{other.pid}\n")
        assert supervisor.status(tmp_path)["prefect"] is None
        messages = supervisor.stop(tmp_path)
        assert "prefect: not running (removed a stale pid file)" in messages
        assert other.poll() is None, "stop killed a process that was not a server"
        assert not (tmp_path / ".servers" / "prefect.pid").exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize(
    ("code", "said"),
    [
        ("import sys; print('no store here'); sys.exit(3)", "mlflow exited with status 3 while starting"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "mlflow was killed by SIGKILL while starting (not by this supervisor)"),
    ],
)
def test_a_server_that_dies_while_starting_is_reported_with_its_exit_status(tmp_path, code, said):
    """Before: a server gone before it answered was reported only as "exited", from a /proc scan,
    which cannot tell an exit from a kill. Its own process handle gives the status or the signal."""
    (tmp_path / ".servers").mkdir()
    server = supervisor.Server("mlflow", free_port(), [sys.executable, "-c", code], "/health", {})
    proc = supervisor._spawn(tmp_path, server)
    with pytest.raises(supervisor.ServerError) as raised:
        supervisor._wait_healthy(tmp_path, {"mlflow": (server, proc)}, timeout=60)
    assert str(raised.value).startswith(said)
    if "exit" in code:
        assert "no store here" in str(raised.value)  # the end of its log comes with it


def test_stop_leaves_no_process_and_no_pid_file(started):
    root, env, ports, _ = started
    pids = supervisor.status(root)
    assert all(pids.values()), pids
    proc = make("stop", root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, pid in pids.items():
        assert f"{name}: stopped (pid {pid})" in proc.stdout
        assert supervisor.group_members(pid) == []  # the server and every worker it started
        assert not (root / ".servers" / f"{name}.pid").exists()
    assert listening_addresses(ports["prefect"]) == set()
    assert listening_addresses(ports["mlflow"]) == set()
    assert listening_addresses(ports["flows"]) == set()
    again = make("stop", root, env)
    assert all(f"{name}: not running" in again.stdout for name in ("prefect", "mlflow", "flows")), again.stdout
