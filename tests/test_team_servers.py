"""Team servers (docs/team-servers.md): XFER_TRACKING_URI, and MLflow on a real PostgreSQL.

The module starts Debian's PostgreSQL in a fresh data directory (as the
`postgres` user when the tests run as root: PostgreSQL refuses root), on a
free port of 127.0.0.1 only, with trust authentication; then an `mlflow
server` over it with its own artifact folder, and a Prefect server over the
same PostgreSQL. The pipeline runs as a separate process the way a team member
runs it, with XFER_TRACKING_URI and PREFECT_API_URL naming those servers; the
tests read the result back through the servers and straight from PostgreSQL.
Everything is stopped and deleted at the end of the module.

Without PostgreSQL these tests are skipped with that reason, except under CI
(CI=true), where they fail: .ci/run installs the postgresql package.
XFER_POSTGRES_BIN names another bin folder (initdb, pg_ctl).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, TINY_PARAMS, free_port, listening_addresses, local_and_ci_verdicts, write_params
from test_registry import target_test_folder, xfer_cli

HOST = "127.0.0.1"
STAGES = ["fetch", "split", "features", "head", "finetune", "evaluate"]
MODEL = TINY_PARAMS["registry"]["name"]
START_TIMEOUT_S = 180


# -- unit: XFER_TRACKING_URI, no server needed --------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ("postgres://u:s3cret@db/mlflow", "scheme 'postgres'"),  # SQLAlchemy wants postgresql://
        ("mlflow.team:5000", "is not a URI (no scheme://)"),
        ("s3://bucket/mlflow", "scheme 's3'"),
        ("http://", "names no host"),
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not installed.
        ("postgresql://u@db/mlflow", "write postgresql+psycopg2://"),
    ],
)
def test_a_bad_tracking_uri_is_refused_naming_the_variable(monkeypatch, tmp_path, value, message):
    from tasks import tracking
    from xfer.layout import Layout

    monkeypatch.setenv("XFER_TRACKING_URI", value)
    with pytest.raises(tracking.TrackingURIError, match=r"XFER_TRACKING_URI=") as err:
        tracking.use_store(Layout(tmp_path), "xfer")
    assert message in str(err.value)
    assert "s3cret" not in str(err.value), "a password must not reach the message"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_unset_tracking_uri_keeps_the_projects_sqlite_store(monkeypatch, tmp_path):
    from tasks import report, tracking
    from xfer.layout import Layout

    monkeypatch.delenv("XFER_TRACKING_URI", raising=False)
    monkeypatch.delenv("XFER_MLFLOW_UI", raising=False)
    assert tracking.tracking_uri(Layout(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert report.mlflow_ui() == "http://127.0.0.1:5000"
    monkeypatch.setenv("XFER_TRACKING_URI", "")  # empty is unset
    assert tracking.tracking_uri(Layout(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("XFER_TRACKING_URI", "http://mlflow.team:5000/")
    assert tracking.tracking_uri(Layout(tmp_path)) == "http://mlflow.team:5000/"
    assert report.mlflow_ui() == "http://mlflow.team:5000", "report links follow the team server"
    monkeypatch.setenv("XFER_MLFLOW_UI", "https://mlflow.example.org")
    assert report.mlflow_ui() == "https://mlflow.example.org", "XFER_MLFLOW_UI still wins"


def test_bad_tracking_uri_stops_the_pipeline_and_predict_before_any_work(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    env = {**os.environ, "XFER_TRACKING_URI": "postgres://mlflow@db/mlflow", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # The user name is masked too: a bare user name is how many services take a token (xfer/redact.py).
    assert "mlflow@" not in proc.stderr + proc.stdout, proc.stderr
    assert "error: XFER_TRACKING_URI='postgres://***@db/mlflow'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "nothing may run before the check"
    # A stage as dvc repro runs it: the same one-line refusal.
    proc = subprocess.run(
        [sys.executable, "-m", "flows.stages", "fetch", "--root", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "error: XFER_TRACKING_URI='postgres://***@db/mlflow'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    (tmp_path / "a.png").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "predict", str(tmp_path / "a.png"), "--root", str(tmp_path), "--out", str(tmp_path / "p.csv")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "xfer predict: XFER_TRACKING_URI='postgres://***@db/mlflow'" in proc.stderr, proc.stderr
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "mlflow.db").exists()


# -- a real PostgreSQL ----------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder holding initdb and pg_ctl (or XFER_POSTGRES_BIN)."""
    if "XFER_POSTGRES_BIN" in os.environ:
        candidates = [os.environ["XFER_POSTGRES_BIN"]]
    else:
        candidates = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True
        )
    for candidate in map(Path, candidates):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def missing(what: str) -> None:
    """Skip the tests that need `what`, but fail under CI, which must run them."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL tests cannot run: {what}, and CI must run them (.ci/run installs the postgresql package)")
    pytest.skip(f"PostgreSQL tests skipped: {what} (apt-get install postgresql)")


@dataclass(frozen=True)
class Postgres:
    bin: Path
    base: Path  # data directory, log and unix sockets, owned by the server's user
    port: int

    def url(self, user: str, db: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{user}@{HOST}:{self.port}/{db}"

    @contextlib.contextmanager
    def cursor(self, db: str, user: str = "postgres"):
        """A cursor on `db` as `user`, each statement its own transaction; closed afterwards."""
        import psycopg2

        conn = psycopg2.connect(host=HOST, port=self.port, dbname=db, user=user)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()


def _as_server_user(owner: pwd.struct_passwd | None, command: list) -> list[str]:
    return ["runuser", "-u", owner.pw_name, "--", *map(str, command)] if owner else list(map(str, command))


@pytest.fixture(scope="module")
def postgres():
    """PostgreSQL on 127.0.0.1:<free port> in a new data directory; stopped and deleted afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing(f"no initdb/pg_ctl in {os.environ.get('XFER_POSTGRES_BIN', '/usr/lib/postgresql/*/bin')}")
    owner = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no `postgres` user to run the server as")
    base = Path(tempfile.mkdtemp(prefix="xfer-pg-"))  # not under tmp_path: its parents are root-only
    if owner:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log, port = base / "data", base / "postgres.log", free_port()
    run = lambda *cmd: subprocess.run(_as_server_user(owner, cmd), cwd=base, capture_output=True, text=True, timeout=120)  # noqa: E731
    started = False
    try:
        proc = run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync")
        assert proc.returncode == 0, f"initdb failed:\n{proc.stdout}\n{proc.stderr}"
        options = f"-h {HOST} -p {port} -k {base} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        proc = run(bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        started = True
        assert proc.returncode == 0, f"pg_ctl start failed:\n{proc.stdout}\n{proc.stderr}\n{log.read_text() if log.exists() else ''}"
        server = Postgres(bin_dir, base, port)
        with server.cursor("postgres") as cur:
            for name in ("mlflow", "prefect"):  # one role and database per server, as docs/team-servers.md does
                cur.execute(f"CREATE ROLE {name} LOGIN")
                cur.execute(f"CREATE DATABASE {name} OWNER {name}")
        yield server
    finally:
        if started:
            run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(base, ignore_errors=True)


# -- the team's servers over it ---------------------------------------------------


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class Background:
    """A server in its own process group, with its log; stop() ends the group."""

    def __init__(self, name: str, command: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def wait_healthy(self, url: str, deadline: float) -> None:
        while not _healthy(url):
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) while starting:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not answer {url} within {START_TIMEOUT_S} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    """`mlflow server` and `prefect server start`, both over the PostgreSQL, on 127.0.0.1: their URLs."""
    base = tmp_path_factory.mktemp("team-servers")
    artifacts = base / "mlflow-artifacts"
    artifacts.mkdir()
    ports = {"mlflow": free_port(), "prefect": free_port()}
    common = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for leak in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "XFER_TRACKING_URI"):
        common.pop(leak, None)
    mlflow_cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", postgres.url("mlflow", "mlflow"),
        "--artifacts-destination", str(artifacts),
        "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
    ]  # fmt: skip
    # GenAI job execution starts extra consumers the pipeline never uses.
    mlflow_env = {**common, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    prefect_cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", HOST, "--port", str(ports["prefect"])]
    prefect_env = {
        **common,
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", "prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    started = time.monotonic()
    running = [Background("mlflow", mlflow_cmd, mlflow_env, base / "mlflow.log"), Background("prefect", prefect_cmd, prefect_env, base / "prefect.log")]
    try:
        deadline = started + START_TIMEOUT_S
        running[0].wait_healthy(f"http://{HOST}:{ports['mlflow']}/health", deadline)
        running[1].wait_healthy(f"http://{HOST}:{ports['prefect']}/api/health", deadline)
        print(f"mlflow and prefect servers on PostgreSQL answered in {time.monotonic() - started:.1f} s")
        yield {"mlflow": f"http://{HOST}:{ports['mlflow']}", "prefect_api": f"http://{HOST}:{ports['prefect']}/api", "artifacts": artifacts, "ports": ports}
    finally:
        for server in running:
            server.stop()


@pytest.fixture(scope="module")
def team_run(servers, tmp_path_factory):
    """The pipeline, run as a team member runs it: its own process, both servers named by environment variables."""
    root = tmp_path_factory.mktemp("team-project")
    write_params(root, TINY_PARAMS)
    env = {**os.environ, "XFER_TRACKING_URI": servers["mlflow"], "PREFECT_API_URL": servers["prefect_api"], "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("XFER_PIPELINE_RUN_ID", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    print(f"pipeline against the team servers in {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root, json.loads((root / "metrics/eval.json").read_text())


@pytest.fixture(scope="module")
def client(servers):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=servers["mlflow"])


def stage_runs(client) -> dict:
    exp = client.get_experiment_by_name(TINY_PARAMS["mlflow"]["experiment"])
    return {r.data.tags["xfer.stage"]: r for r in client.search_runs([exp.experiment_id], "tags.`xfer.kind` = 'stage'")}


@pytest.mark.slow
def test_servers_listen_on_loopback_only(servers, postgres):
    for port in (*servers["ports"].values(), postgres.port):
        assert listening_addresses(port) == {HOST}, port


@pytest.mark.slow
def test_stage_runs_metrics_and_champion_come_back_through_the_mlflow_server(team_run, client, servers, monkeypatch):
    root, evaluated = team_run
    exp = client.get_experiment_by_name(TINY_PARAMS["mlflow"]["experiment"])
    # Created by the pipeline without a folder of this machine: the server's artifact root.
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = stage_runs(client)
    assert sorted(runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    (pipeline_run,) = client.search_runs([exp.experiment_id], "tags.`xfer.kind` = 'pipeline'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {pipeline_run.info.run_id}
    evaluate = runs["evaluate"]
    for model in ("head", "finetune", "fusion"):
        assert evaluate.data.metrics[f"{model}.target_test.accuracy"] == pytest.approx(evaluated[model]["target_test"]["accuracy"], abs=1e-12)
    assert [m.step for m in client.get_metric_history(runs["head"].info.run_id, "head.source_val_accuracy")] == [1, 2, 3, 4]

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.run_id == evaluate.info.run_id
    assert float(champion.tags["target_val.accuracy"]) == pytest.approx(evaluated[TINY_PARAMS["registry"]["model"]]["target_val"]["accuracy"])

    # The logged model's files, downloaded through the server, are the ones in its --artifacts-destination.
    import mlflow

    # A models:/ URI is resolved through MLflow's global registry URI, whatever the call names:
    # an earlier test's set_tracking_uri would point it at another store.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", servers["mlflow"])
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL}@champion", tracking_uri=servers["mlflow"], registry_uri=servers["mlflow"], dst_path=str(root.parent / "champion")
        )
    )
    assert (downloaded / "MLmodel").is_file() and (downloaded / "artifacts" / "bundle").is_dir()
    stored = {p.name for p in servers["artifacts"].rglob("MLmodel")}
    assert stored == {"MLmodel"}, "the model's files must be in the server's artifact folder"
    assert {a.path for a in client.list_artifacts(evaluate.info.run_id)} >= {"eval.json", "promotion.json"}
    # Nothing went to a store of the project's own.
    assert not {"mlflow.db", "mlartifacts", "mlruns"} & {p.name for p in root.iterdir()}


@pytest.mark.slow
def test_runs_metrics_and_registry_rows_are_in_postgresql(team_run, client, postgres):
    root, evaluated = team_run
    evaluate = stage_runs(client)["evaluate"]
    with postgres.cursor("mlflow", user="mlflow") as cur:
        cur.execute(
            "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e USING (experiment_id) WHERE e.name = %s", (TINY_PARAMS["mlflow"]["experiment"],)
        )
        rows = dict(cur.fetchall())
        cur.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = %s", (evaluate.info.run_id, "fusion.target_test.accuracy"))
        (accuracy,) = cur.fetchone()
        cur.execute("SELECT name FROM registered_models")
        models = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL,))
        aliases = dict(cur.fetchall())
    assert len(rows) == 1 + len(STAGES) and set(rows.values()) == {"FINISHED"} and evaluate.info.run_id in rows
    assert accuracy == pytest.approx(evaluated["fusion"]["target_test"]["accuracy"], abs=1e-12)
    assert models == [MODEL] and aliases == {"champion": 1}


@pytest.mark.slow
def test_a_database_tracking_uri_reads_the_same_store(team_run, postgres, monkeypatch):
    """XFER_TRACKING_URI may name the database itself: the same runs and champion, no server in between."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import tracking_uri
    from xfer.layout import Layout

    root, evaluated = team_run
    monkeypatch.setenv("XFER_TRACKING_URI", postgres.url("mlflow", "mlflow"))
    direct = MlflowClient(tracking_uri=tracking_uri(Layout(root)))
    evaluate = stage_runs(direct)["evaluate"]
    assert evaluate.data.metrics["fusion.target_test.accuracy"] == pytest.approx(evaluated["fusion"]["target_test"]["accuracy"], abs=1e-12)
    assert direct.get_model_version_by_alias(MODEL, "champion").run_id == evaluate.info.run_id


@pytest.mark.slow
def test_xfer_predict_takes_the_champion_from_the_team_server(team_run, servers, tmp_path, monkeypatch):
    root, evaluated = team_run
    folder = target_test_folder(root, tmp_path / "target_test")
    out = tmp_path / "predictions.csv"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XFER_TRACKING_URI", servers["mlflow"])
    proc = xfer_cli("predict", str(folder), "--out", str(out), "--root", str(root), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    predictions = pd.read_csv(out, dtype={"class": str})
    truth = predictions.path.map(lambda p: Path(p).parent.name)
    expected = evaluated[TINY_PARAMS["registry"]["model"]]["target_test"]
    assert len(predictions) == expected["n"]
    assert (predictions["class"] == truth).mean() == pytest.approx(expected["accuracy"], abs=1e-9)
    assert not (root / "mlflow.db").exists()
    # The variable is what found it: without it, the project's own (empty) store has no champion.
    monkeypatch.delenv("XFER_TRACKING_URI")
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    write_params(elsewhere, TINY_PARAMS)
    proc = xfer_cli("predict", str(folder), "--out", str(tmp_path / "none.csv"), "--root", str(elsewhere), cwd=REPO)
    assert proc.returncode == 2 and f"cannot load model models:/{MODEL}@champion" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_pipelines_flow_runs_are_in_the_prefect_servers_postgresql(team_run, postgres):
    with postgres.cursor("prefect", user="prefect") as cur:
        cur.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        runs = cur.fetchall()
    # The pipeline flow and each stage flow (and any subflow a stage starts), all completed.
    assert {name for name, _ in runs} >= {"xfer-pipeline", *STAGES}, runs
    assert {state for _, state in runs} == {"COMPLETED"}, runs


def test_missing_postgresql_skips_locally_and_fails_under_ci(tmp_path):
    """The message `make test` shows without PostgreSQL, and CI's verdict."""
    test = "tests/test_team_servers.py::test_servers_listen_on_loopback_only"
    local, ci = local_and_ci_verdicts(test, {"XFER_POSTGRES_BIN": str(tmp_path / "no-postgres")})
    assert local.returncode == 0, local.stdout
    assert f"PostgreSQL tests skipped: no initdb/pg_ctl in {tmp_path / 'no-postgres'}" in local.stdout
    assert ci.returncode == 1, ci.stdout
    assert "PostgreSQL tests cannot run" in ci.stdout and "1 error" in ci.stdout
