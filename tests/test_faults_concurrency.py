"""Faults, concurrency (issue 17): two real processes raced on one registry, one download, one project.

Each race starts its processes together (they wait for a barrier file) and
forces the harmful interleaving rather than hoping for it: the promotion
children wait, after reading the champion, until the rival has read it too
(tests/promote_child.py); the download is served slowly, so two downloads
overlap for most of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port
from http_server import serve_directory

from xfer.locks import LockedError, project_lock

BETTER, WORSE = 0.333, 0.1
TIMEOUT_S = 120


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for leak in ("MLFLOW_TRACKING_URI", "XFER_TRACKING_URI", "XFER_PIPELINE_RUN_ID", "PREFECT_API_URL"):
        env.pop(leak, None)
    return env


def start_together(commands: dict[str, list[str]], barrier: Path, cwd: Path) -> dict[str, subprocess.Popen]:
    """Start each command; they wait for <barrier>/go, written once every one has written <barrier>/ready-<name>."""
    barrier.mkdir(exist_ok=True)
    procs = {
        name: subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    deadline = time.monotonic() + TIMEOUT_S
    while not all((barrier / f"ready-{name}").exists() for name in procs):
        for name, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) before the start:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the racers never got ready"
        time.sleep(0.02)
    (barrier / "go").touch()
    return procs


def finish(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str, str]]:
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        out[name] = (proc.returncode, stdout, stderr)
    return out


# -- promotion -----------------------------------------------------------------------------------


def race_promotions(uri: str, barrier: Path) -> dict[str, dict]:
    """The better model ("early") and the worse ("late") registered at once into the store at `uri`: their decisions."""
    child = str(REPO / "tests" / "promote_child.py")
    commands = {role: [sys.executable, child, uri, str(figure), str(barrier), role] for role, figure in (("early", BETTER), ("late", WORSE))}
    results = finish(start_together(commands, barrier, barrier.parent))
    for role, (code, stdout, stderr) in results.items():
        assert code == 0, f"{role}:\n{stderr[-4000:]}"
    return {role: json.loads(stdout.strip().splitlines()[-1]) for role, (_, stdout, _) in results.items()}


def registry_state(uri: str) -> tuple[str, dict[str, dict]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {str(v.version): v.tags for v in client.search_model_versions("name = 'xfer'")}
    return str(client.get_model_version_by_alias("xfer", "champion").version), versions


def test_two_promotions_at_once_in_a_sqlite_store_take_turns_and_the_better_stays_champion(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(tracking_uri=uri).search_experiments()  # the store exists before the race, as after any stage
    decisions = race_promotions(uri, tmp_path / "barrier")

    champion, versions = registry_state(uri)
    assert float(versions[champion]["target_val.accuracy"]) == BETTER, (champion, versions, decisions)
    assert champion == decisions["early"]["version"]
    # Taking turns: whichever promoted second read the first one's version as the champion.
    read = {role: json.loads((tmp_path / "barrier" / f"read-{role}").read_text())[0] for role in decisions}
    first, second = sorted(read.values(), key=lambda found: found[1] is not None)
    assert first == [None, None] and str(second[1]) == "1", f"not one after the other: (figure, version) read as the champion: {read}"
    assert (tmp_path / "mlflow.db.lock").is_file()


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` over a sqlite store on 127.0.0.1, as a team runs one: its URL."""
    from test_team_servers import Background

    base = tmp_path / "server"
    base.mkdir()
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = Background("mlflow", command, {**child_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, base / "mlflow.log")
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", time.monotonic() + TIMEOUT_S)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_two_promotions_at_once_through_a_server_are_settled_on_the_better_version(mlflow_server, tmp_path):
    decisions = race_promotions(mlflow_server, tmp_path / "barrier")

    champion, versions = registry_state(mlflow_server)
    assert champion == decisions["early"]["version"], f"@champion is on version {champion}: {versions}"
    assert float(versions[champion]["target_val.accuracy"]) == BETTER
    # Both read "no champion" (no lock reaches a server store); the worse one's promotion was undone.
    for role in ("early", "late"):
        assert json.loads((tmp_path / "barrier" / f"read-{role}").read_text())[0] == [None, None], role
    late = decisions["late"]
    assert not late["promoted"] and late["alias"] == "challenger" and late["champion_version"] == champion
    assert "promoted at the same time" in late["reason"]
    assert versions[late["version"]]["promotion"] == "challenger" and versions[champion]["promotion"] == "champion"


# -- download ------------------------------------------------------------------------------------

SIZE = 4_000_000
DOWNLOAD = """
import hashlib, sys, time
from pathlib import Path
from xfer.data.download import download
url, dest, sha, barrier, name = sys.argv[1:]
(Path(barrier) / f"ready-{name}").touch()
while not (Path(barrier) / "go").exists():
    time.sleep(0.01)
path = download(url, Path(dest), sha, progress=False)
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


@pytest.fixture
def slow_file(tmp_path):
    """(server, bytes, sha256): SIZE random bytes served in 16 slow pieces, about a second a download."""
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(SIZE)
    (www / "big.bin").write_bytes(data)
    with serve_directory(www) as server:
        server.pace("big.bin", SIZE // 16, 0.06)
        yield server, data, hashlib.sha256(data).hexdigest()


def test_two_downloads_of_one_url_at_once_publish_exactly_the_served_bytes(slow_file, tmp_path):
    server, data, sha = slow_file
    dest = tmp_path / "downloads" / "big.bin"
    commands = {name: [sys.executable, "-c", DOWNLOAD, server.url("big.bin"), str(dest), sha, str(tmp_path / "barrier"), name] for name in ("a", "b")}
    results = finish(start_together(commands, tmp_path / "barrier", tmp_path))

    for name, (code, stdout, stderr) in results.items():
        assert code == 0, f"{name}:\n{stderr[-3000:]}"
        assert stdout.strip() == sha, name
    assert dest.read_bytes() == data
    # One transfer: the second waited for the first's .part, then found the file published.
    assert len(server.requests_for("big.bin")) == 1, server.requests_for("big.bin")
    assert sum("another process is downloading" in stderr for _, _, stderr in results.values()) == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == ["big.bin"]


def test_a_part_another_writer_changed_is_never_published_as_verified(slow_file, tmp_path):
    """A writer that takes no lock (another tool, another machine on NFS): the digest is of the bytes on disk."""
    server, data, sha = slow_file
    dest = tmp_path / "downloads" / "big.bin"
    barrier = tmp_path / "barrier"
    procs = start_together({"a": [sys.executable, "-c", DOWNLOAD, server.url("big.bin"), str(dest), sha, str(barrier), "a"]}, barrier, tmp_path)
    part = dest.with_name("big.bin.part")
    deadline = time.monotonic() + TIMEOUT_S
    while not (part.exists() and part.stat().st_size > 0):
        assert time.monotonic() < deadline and procs["a"].poll() is None, "the download never started"
        time.sleep(0.01)
    with open(part, "ab") as f:
        f.write(b"written by someone else")
    code, _, stderr = finish(procs)["a"]
    assert code != 0 and "sha256 mismatch" in stderr, stderr[-3000:]
    assert not dest.exists(), "a file whose bytes are not the served file was published"


# -- one run of a project at a time ---------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from xfer.locks import project_lock
root, ready = sys.argv[1:]
with project_lock(root):
    Path(ready).touch()
    time.sleep(600)
"""


def test_a_second_run_of_a_busy_project_is_refused_naming_the_run_in_progress(project, tmp_path, capsys):
    """`make pipeline` or a stage of `dvc repro` while another run holds the project: refused before any work."""
    from flows import pipeline as pipeline_module
    from flows.pipeline import pipeline
    from flows.stages import BUSY_EXIT, STAGE_FLOWS

    ready = tmp_path / "holder-ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(project), str(ready)], env=child_env())
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.02)
        before = sorted(p.name for p in project.iterdir())
        message = f"another run of this project is in progress (pid {holder.pid})"
        # A stage as `dvc repro` runs it, in its own process ...
        proc = subprocess.run(
            [sys.executable, "-m", "flows.stages", "evaluate", "--root", str(project)],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == BUSY_EXIT and message in proc.stderr, (proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
        # ... `make pipeline` (python -m flows.pipeline; in this process, to spare an import of everything) ...
        capsys.readouterr()
        assert pipeline_module.main(["--root", str(project)]) == BUSY_EXIT
        assert message in capsys.readouterr().err
        # The flows themselves (as a Prefect deployment runs them) take the same lock.
        for flow_fn in (STAGE_FLOWS["fetch"].fn, pipeline.fn):
            with pytest.raises(LockedError, match=message.replace("(", r"\(").replace(")", r"\)")):
                flow_fn(root=str(project))
        assert sorted(p.name for p in project.iterdir()) == before, "a refused run wrote into the project"
        assert not (project / "mlflow.db").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # Killed, its lock is gone with it: the next run is not refused.
    with project_lock(project):
        pass


def test_the_project_lock_is_reentrant_in_its_process_and_exclusive_across_processes(tmp_path):
    """The pipeline holds the lock and runs its stages, which take it again: no wait on itself; another process is refused."""
    probe = "import sys\nfrom xfer.locks import LockedError, project_lock\ntry:\n    with project_lock(sys.argv[1]):\n        print('taken')\nexcept LockedError as e:\n    print(e)\n"
    with project_lock(tmp_path):
        with project_lock(str(tmp_path / "." / "sub" / "..")):  # the same project, spelt otherwise
            out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert f"another run of this project is in progress (pid {os.getpid()})" in out.stdout, out.stdout + out.stderr
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert "in progress" in out.stdout, "the inner release must not free the outer hold"
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.stdout.strip() == "taken", out.stdout + out.stderr
