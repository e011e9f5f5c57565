"""After SIGKILL: no leftovers, no runs RUNNING forever, no orphans, no open listeners (issue 17, part 7).

Real stage processes (`python -m flows.stages <stage> --root <dir>`) are killed
with SIGKILL at a known point (their MLflow run is open, their workers are up),
then the stage runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_PARAMS, write_params

from xfer.io import atomic_dir, atomic_path, remove_leftovers
from xfer.procs import process_identity

DVC = str(Path(sys.executable).parent / "dvc")


# --- processes, sockets and stores, read from /proc and the sqlite files ---


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def naming(text: str) -> set[int]:
    """Live processes whose command line contains `text` (a project folder)."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and text in cmdline(int(p)) and alive(int(p))}


def listeners(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets listening in `pids`, from /proc/<pid>/fd and /proc/net."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                addr, port = cols[1].split(":")
                if len(addr) == 8 or addr.startswith("0000000000000000FFFF0000"):  # IPv4, or IPv4-mapped IPv6
                    shown = ".".join(str(b) for b in bytes.fromhex(addr[-8:])[::-1])
                else:
                    shown = "::" if set(addr) == {"0"} else "ipv6:" + addr
                found.add((shown, int(port, 16)))
    return found


def wait_for(what, timeout: float, message: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{message}: the process ended first ({proc.returncode}):\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out: {message}")


def query(db: Path, sql: str, *args) -> list[tuple]:
    """Read-write on purpose: a writer killed inside a transaction leaves a hot journal, which a read-only
    connection cannot roll back ("attempt to write a readonly database"); this rolls it back, as MLflow's
    next client would. Only a table not made yet reads as no rows: any other error fails the test."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return []
            raise


def mlflow_runs_of(root: Path, pid: int) -> list[tuple[str, str]]:
    """(run id, status) of the MLflow runs whose owner tag names `pid`."""
    return query(
        root / "mlflow.db",
        "select r.run_uuid, r.status from runs r join tags t on r.run_uuid = t.run_uuid where t.key = 'xfer.owner.pid' and t.value = ?",
        str(pid),
    )


def prefect_runs_of(home: Path, pid: int) -> list[tuple[str, str]]:
    """(flow run id, state type) of the Prefect flow runs whose owner tag names `pid`."""
    rows = query(home / "prefect.db", "select id, state_type, tags from flow_run")
    return [(run_id, state) for run_id, state, tags in rows if any(t.split(":")[-2:-1] == [str(pid)] for t in json.loads(tags or "[]"))]


def stage_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    for name in ("PREFECT_API_URL", "XFER_PIPELINE_RUN_ID", "XFER_TRACKING_URI"):
        env.pop(name, None)
    return env


def start_stage(stage: str, root: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.stages", stage, "--root", str(root)],
        cwd=REPO,
        env=stage_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_stage(stage: str, root: Path, home: Path) -> str:
    proc = start_stage(stage, root, home)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def killed_writer(dest: Path, folder: bool = False) -> None:
    """A real process killed by SIGKILL in the middle of an atomic write of `dest`."""
    code = (
        "import os, signal, sys\n"
        "from xfer.io import atomic_dir, atomic_path\n"
        f"with ({'atomic_dir' if folder else 'atomic_path'})(sys.argv[1]) as tmp:\n"
        "    (tmp / 'part' if tmp.is_dir() else tmp).write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL


def copy_project(source: Path, root: Path, params: dict) -> Path:
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    write_params(root, params)
    return root


# --- atomic writes: leftovers, fsync, DVC ---


def test_a_killed_writer_leaves_temporaries_the_next_run_removes(tmp_path):
    out = tmp_path / "plots" / "evaluate"
    out.mkdir(parents=True)
    (out / "keep.png").write_bytes(b"png")
    (out / ".gitkeep").write_bytes(b"")
    (out / "notes.tmp").write_bytes(b"the user's")
    killed_writer(out / "confusion.png")
    killed_writer(tmp_path / "models" / "head", folder=True)
    killed_writer(tmp_path / "metrics" / "eval.json")
    killed_writer(tmp_path / "metrics" / "head.json")
    left = sorted(p.name for p in [*out.iterdir(), *(tmp_path / "models").iterdir(), *(tmp_path / "metrics").iterdir()])
    assert len([n for n in left if n.endswith(".tmp")]) == 5, left  # notes.tmp and four leftovers

    removed = remove_leftovers([out, tmp_path / "models" / "head", tmp_path / "metrics" / "eval.json"])

    assert len(removed) == 3
    assert sorted(p.name for p in out.iterdir()) == [".gitkeep", "keep.png", "notes.tmp"]
    assert list((tmp_path / "models").iterdir()) == []
    # Another stage's temporary (head.json) is not this stage's to remove.
    assert [p.name.split(".")[1] for p in (tmp_path / "metrics").iterdir()] == ["head"]


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
        staged = str(tmp)
    assert synced == [staged, str(tmp_path)]  # the file's bytes, then the folder's new entry
    synced.clear()
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x").write_text("x")
        staged = str(tmp)
    assert synced[:2] == [f"{staged}/x", staged] and synced[-1] == str(tmp_path)


def test_dvc_never_hashes_a_killed_writers_temporaries(tmp_path):
    shutil.copy(REPO / ".dvcignore", tmp_path / ".dvcignore")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    out = tmp_path / "plots" / "evaluate"
    out.mkdir(parents=True)
    (out / "confusion.png").write_bytes(b"png")
    killed_writer(out / "roc.png")
    killed_writer(tmp_path / "plots" / "evaluate" / "sub", folder=True)
    subprocess.run([DVC, "add", "-q", "plots/evaluate"], cwd=tmp_path, env=env, check=True)
    dvc_file = yaml_load(tmp_path / "plots" / "evaluate.dvc")
    assert dvc_file["outs"][0]["nfiles"] == 1  # confusion.png only
    leftovers = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 2
    for path in leftovers:
        check = subprocess.run([DVC, "check-ignore", str(path.relative_to(tmp_path))], cwd=tmp_path, env=env)
        assert check.returncode == 0, path


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# --- MLflow and Prefect runs left RUNNING ---


def test_only_runs_of_dead_processes_are_marked_failed(tmp_path):
    """A RUNNING run of a live process (a concurrent stage) is left alone; one of a dead process fails."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import TAG_OWNER_HOST, TAG_OWNER_PID, TAG_OWNER_STAGE, TAG_OWNER_START, fail_orphaned_runs

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("xfer", artifact_location=(tmp_path / "art").as_uri())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_identity = process_identity(dead.pid)
    dead.wait()
    try:
        runs = {}
        for name, who, stage in (
            ("live", process_identity(live.pid), "head"),
            ("dead", dead_identity, "head"),
            ("dead-other-stage", dead_identity, "split"),
            ("dead-other-host", {**dead_identity, "host": "elsewhere"}, "head"),
        ):
            tags = {TAG_OWNER_STAGE: stage, TAG_OWNER_HOST: who["host"], TAG_OWNER_PID: who["pid"], TAG_OWNER_START: who["start"]}
            runs[name] = client.create_run(exp, run_name=name, tags=tags).info.run_id
        # The pid reused by a process started later is not the recorded one.
        reused = {TAG_OWNER_STAGE: "head", TAG_OWNER_HOST: dead_identity["host"], TAG_OWNER_PID: str(live.pid), TAG_OWNER_START: "1"}
        runs["reused-pid"] = client.create_run(exp, run_name="reused", tags=reused).info.run_id

        failed = fail_orphaned_runs(exp, "head")

        assert sorted(failed) == sorted([runs["dead"], runs["reused-pid"]])
        status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
        assert status == {"live": "RUNNING", "dead": "FAILED", "dead-other-stage": "RUNNING", "dead-other-host": "RUNNING", "reused-pid": "FAILED"}
    finally:
        live.kill()
        live.wait()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One PREFECT_HOME for this module's stage processes: its database is migrated once."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def built(tmp_path_factory, home) -> Path:
    """A project through fetch, split and features (one stage process each time), to copy from."""
    root = tmp_path_factory.mktemp("built")
    write_params(root, TINY_PARAMS)
    code = "import sys; from flows.stages import main; sys.exit(max(main([s, '--root', sys.argv[1]]) for s in ('fetch', 'split', 'features')))"
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, env=stage_env(home), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_killed_stage_run_is_failed_crashed_and_cleaned_by_the_next_run(built, home, tmp_path, tiny_params):
    """SIGKILL the head stage while its MLflow run is open: its temporary Prefect server dies with it;
    the next head run removes the temporaries, marks the MLflow run FAILED and the flow run CRASHED."""
    slow = json.loads(json.dumps(tiny_params))
    slow["head"]["epochs"] = 10000  # long enough to be killed in the middle
    root = copy_project(built, tmp_path / "project", slow)

    proc = start_stage("head", root, home)
    try:
        wait_for(lambda: mlflow_runs_of(root, proc.pid), 180, "the head stage's MLflow run", proc)
        children = descendants(proc.pid)
        server = {pid for pid in children if "uvicorn" in cmdline(pid)}
        assert server, [cmdline(p) for p in children]
        assert prefect_runs_of(home, proc.pid)[0][1] == "RUNNING"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    # Its temporary Prefect server (and anything else it started) dies with it.
    wait_for(lambda: not any(alive(p) for p in children), 20, f"orphans {[cmdline(p) for p in children if alive(p)]}")
    [(killed_run, status)] = mlflow_runs_of(root, proc.pid)
    assert status == "RUNNING"
    # What a stage killed in the middle of its writes leaves (the same calls, killed at a known point).
    killed_writer(root / "plots" / "head" / "confusion_source_test.png")
    killed_writer(root / "models" / "head", folder=True)
    # And a checkpoint write (finetune saves one each epoch) killed the same way: checkpoints/ is no
    # stage's output, but no other stage can be writing there while this one holds the project lock.
    killed_writer(root / "checkpoints" / "finetune" / "last.pt")
    assert len(list(root.glob("plots/head/.*.tmp"))) == 1 and len(list(root.glob("models/.head.*.tmp"))) == 1
    assert len(list(root.glob("checkpoints/finetune/.last.pt.*.tmp"))) == 1

    write_params(root, tiny_params)
    run_stage("head", root, home)

    assert mlflow_runs_of(root, proc.pid) == [(killed_run, "FAILED")]
    assert prefect_runs_of(home, proc.pid)[0][1] == "CRASHED"
    leftovers = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    assert json.loads((root / "metrics" / "head.json").read_text())


def flow_runs_of(home: Path, pid: int) -> dict[str, str]:
    """{flow name: state type} of the Prefect flow runs whose owner tag names `pid`."""
    rows = query(home / "prefect.db", "select flow.name, flow_run.state_type, flow_run.tags from flow_run join flow on flow.id = flow_run.flow_id")
    return {name: state for name, state, tags in rows if any(t.split(":")[-2:-1] == [str(pid)] for t in json.loads(tags or "[]"))}


def test_a_killed_pipelines_flow_run_is_marked_crashed_by_the_next_pipeline(built, home, tmp_path, tiny_params):
    """Before: `make pipeline` killed mid-way (SIGKILL) left its xfer-pipeline flow run RUNNING for ever;
    only its stages' flow runs were marked by their next run."""
    root = copy_project(built, tmp_path / "project", tiny_params)
    command = [sys.executable, "-m", "flows.pipeline", "--root", str(root)]
    proc = subprocess.Popen(command, cwd=REPO, env=stage_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: flow_runs_of(home, proc.pid).get("xfer-pipeline") == "RUNNING", 180, "the pipeline's flow run", proc)
        children = descendants(proc.pid)
        assert {p for p in children if "uvicorn" in cmdline(p)}, [cmdline(p) for p in children]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    # Its temporary Prefect server dies with it (before: orphaned to init, running after the test session).
    wait_for(lambda: not any(alive(p) for p in children), 20, f"orphans {[cmdline(p) for p in children if alive(p)]}")
    killed = flow_runs_of(home, proc.pid)
    assert killed["xfer-pipeline"] == "RUNNING"

    # The next pipeline marks them as it starts: the pipeline's own run at once, a stage run it had
    # begun when that stage starts. Once it has, it is stopped too (the rest would take a minute).
    again = subprocess.Popen(command, cwd=REPO, env=stage_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: set(flow_runs_of(home, proc.pid).values()) == {"CRASHED"}, 300, f"{sorted(killed)} marked CRASHED", again)
        children = descendants(again.pid)
    finally:
        again.kill()
        again.wait()
    wait_for(lambda: not any(alive(p) for p in children), 20, f"orphans {[cmdline(p) for p in children if alive(p)]}")
    assert flow_runs_of(home, proc.pid) == dict.fromkeys(killed, "CRASHED")


def test_killed_finetune_stage_takes_torchrun_and_its_workers_with_it(built, home, tmp_path, tiny_params):
    """As the OOM killer would: SIGKILL the finetune stage process only. torchrun and its workers
    die too and write nothing afterwards; the rendezvous listened on 127.0.0.1 only."""
    tiny_params["finetune"].update(devices=2, device="cpu", epochs=200, max_steps_per_epoch=3)
    root = copy_project(built, tmp_path / "project", tiny_params)
    assert not (root / "models" / "finetune").exists() and not (root / "metrics" / "finetune.json").exists()

    proc = start_stage("finetune", root, home)
    try:

        def workers_listening():
            tree = descendants(proc.pid)
            agent = {p for p in tree if "torchrun" in cmdline(p) or "torch.distributed.run" in cmdline(p)}
            workers = {p for p in tree if "xfer.finetune_job" in cmdline(p)} - agent
            return (tree, agent, workers) if len(workers) >= 2 and agent and listeners(agent) else None

        tree, agent, workers = wait_for(workers_listening, 300, "torchrun and two workers", proc)
        # The rendezvous store (torchrun's) and every other listener of the stage: loopback only.
        assert {addr for addr, _ in listeners(agent)} == {"127.0.0.1"}
        assert {addr for addr, _ in listeners(tree | {proc.pid})} == {"127.0.0.1"}
        time.sleep(2)  # the workers are training
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    wait_for(lambda: not naming(str(root)) and not any(alive(p) for p in tree), 30, f"orphans {[cmdline(p) for p in naming(str(root))]}")
    time.sleep(2)
    # Nothing written after the stage died: no model, no metrics, no history for a stage that is gone.
    assert not (root / "models" / "finetune").exists() and not (root / "metrics" / "finetune.json").exists()
    assert not list(root.glob("checkpoints/finetune/history*"))


def published(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_translate_stage_resumes_at_its_last_epoch_to_what_an_uninterrupted_run_writes(built, home, tmp_path, tiny_params):
    """Acceptance 4 of issue 19: SIGKILL the translate stage once a checkpoint exists; nothing is
    published, and the next run resumes after the checkpoint's epoch and writes the same translator
    and images, byte for byte, as a run that was never killed (one machine: the same kernels)."""
    from xfer.checkpoints import CHECKPOINT_FILE

    tiny_params["translate"] |= {"enabled": True, "image_size": 16, "channels": 4, "residual_blocks": 1, "epochs": 40, "batch_size": 4, "device": "cpu"}
    straight = copy_project(built, tmp_path / "straight", tiny_params)
    run_stage("translate", straight, home)
    root = copy_project(built, tmp_path / "killed", tiny_params)
    checkpoint = root / "checkpoints" / "translate" / CHECKPOINT_FILE

    proc = start_stage("translate", root, home)
    try:
        wait_for(checkpoint.exists, 300, "the translator's first checkpoint", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (root / "data" / "translated").exists() and not (root / "metrics" / "translate.json").exists()
    run_stage("translate", root, home)

    summary = json.loads((root / "metrics" / "translate.json").read_text())
    # Killed after at least one finished epoch and before the last: the rerun reused those, trained the rest.
    assert summary["epochs_reused"] >= 1, summary
    assert summary["epochs_reused"] < summary["epochs"] == 40, summary
    assert summary["cache_hit"] is False, summary
    assert published(root / "data" / "translated") == published(straight / "data" / "translated")
    assert not checkpoint.exists()


def test_temporary_prefect_server_dies_with_its_command_runner(home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.temporary_prefect", sys.executable, "-c", "import time; time.sleep(600)"],
        cwd=REPO,
        env=stage_env(home),
    )
    try:

        def server_and_command():
            tree = descendants(proc.pid)
            server = {p for p in tree if "uvicorn" in cmdline(p)}
            command = {p for p in tree if "time.sleep(600)" in cmdline(p)}
            return (server, command) if server and command else None

        server, command = wait_for(server_and_command, 180, "the temporary server and the command", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not any(alive(p) for p in server), 20, "the temporary server to die")
    finally:
        # Its tree only while it is unreaped: once reaped, its pid may be another test's process.
        stray = descendants(proc.pid) if proc.returncode is None else set()
        proc.kill()
        for pid in stray | naming("time.sleep(600)"):
            os.kill(pid, signal.SIGKILL)


# When each local cluster is up, by what its processes run: Dask's two worker processes (spawned by
# its nannies, which live inside the stage process); Ray's daemons (started by ray.init), a worker
# and the two agents (started by the raylet; the agents are the last to exit, so they must be there).
RAY_PROCESSES = ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent")
CLUSTER_UP = {
    "dask": lambda names: sum("multiprocessing.spawn" in n for n in names) >= 2,
    "ray": lambda names: all(any(m in n for n in names) for m in RAY_PROCESSES) and any("ray::" in n or "default_worker" in n for n in names),
}


# How long each cluster's processes may outlive the stage. Dask's workers exit at once (their pipe to the
# nanny closes). Ray's dashboard agent and runtime-env agent see the raylet die within a second, then
# try to report it to the GCS, which died too, and exit about 60 s later (measured: 60.6 s; the
# GCS client's reconnect timeout setting did not shorten it). They write nothing into the project.
ORPHAN_SECONDS = {"dask": 60, "ray": 180}


@pytest.mark.parametrize("kind", sorted(CLUSTER_UP))
def test_killed_features_stage_takes_its_local_cluster_with_it(built, home, tmp_path, tiny_params, kind):
    """As the OOM killer would: SIGKILL the features stage process only, while its local Dask cluster
    or Ray instance is up: it listened on 127.0.0.1 only; every process below it dies too, and no
    features output appears afterwards."""
    tiny_params["features"].update(batch_size=8, shard_rows=8, runner={"kind": kind, "workers": 2})
    root = copy_project(built, tmp_path / "project", tiny_params)
    for out in ("data/features", "data/feature-cache"):
        shutil.rmtree(root / out)

    proc = start_stage("features", root, home)
    try:

        def cluster_up():
            return CLUSTER_UP[kind]([cmdline(p) for p in descendants(proc.pid)])

        wait_for(cluster_up, 300, f"the local {kind} cluster", proc)
        tree = descendants(proc.pid)  # as late as possible: whatever the cluster started by now
        # Every listener of the stage and its cluster: loopback only (docs/security.md).
        assert {addr for addr, _ in listeners(tree | {proc.pid})} == {"127.0.0.1"}, listeners(tree | {proc.pid})
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    wait_for(lambda: not any(alive(p) for p in tree), ORPHAN_SECONDS[kind], f"orphans {[cmdline(p)[:200] for p in tree if alive(p)]}")
    time.sleep(2)
    assert not (root / "data" / "features").exists(), "nothing is published after the stage died"
