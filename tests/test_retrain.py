"""Scheduled retraining: the flow served on a cron schedule, triggered, promoting through the registry."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import TINY_PARAMS
from test_dvc import make_repo

CRON = "0 3 * * 1"
DEPLOYMENT = "xfer-retrain/nightly-test"


def wait_for_deployment(name: str, server: subprocess.Popen, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise AssertionError(f"the serving process exited with {server.returncode}:\n{server.stdout.read()}")
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise AssertionError(f"deployment {name} did not appear within {timeout} s")


def serve_retrain(root, env: dict, name: str, *extra: str) -> subprocess.Popen:
    """`python -m flows.retrain --serve` for the project at `root`, from its own code, in the background."""
    command = [sys.executable, "-m", "flows.retrain", "--serve", "--name", name, "--root", str(root), *extra]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_served_retrain_has_its_cron_and_a_triggered_run_promotes(tmp_path, prefect_api):
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    root = tmp_path / "project"
    root.mkdir()
    env, _ = make_repo(root, TINY_PARAMS, prefect_api)
    server = serve_retrain(root, env, "nightly-test", "--cron", CRON)
    try:
        deployment = wait_for_deployment(DEPLOYMENT, server)
        assert [s.schedule.cron for s in deployment.schedules] == [CRON]
        assert deployment.parameters["root"] == str(root)

        first = run_deployment(DEPLOYMENT, timeout=600)
        assert first.state.is_completed(), first.state
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        client = MlflowClient()
        champion = client.get_model_version_by_alias("xfer", "champion")
        assert str(champion.version) == "1"
        run = client.get_run(champion.tags["run_id"])
        assert run.data.tags["promotion.decision"] == "promoted"
        assert run.data.tags["promotion.reason"] == "no champion yet"

        # Nothing changed: DVC reruns nothing, so no version is registered and the champion stays.
        second = run_deployment(DEPLOYMENT, timeout=300)
        assert second.state.is_completed(), second.state
        assert len(client.search_model_versions("name = 'xfer'")) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_prefect_yaml_deploys_the_retrain_and_monitor_flows_to_a_work_pool(tmp_path, prefect_api):
    """The committed prefect.yaml, through `prefect deploy --all`, into a real server."""
    import os
    import shutil

    from helpers import REPO, write_params
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    for name in ("flows", "tasks", "xfer", "cli"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", tmp_path / "prefect.yaml")
    write_params(tmp_path, TINY_PARAMS)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="xfer", type="process"))
        except ObjectAlreadyExists:
            pass
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "XFER_PROJECT_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("xfer-retrain/weekly")
    assert deployment.entrypoint == "flows/retrain.py:retrain"
    assert deployment.work_pool_name == "xfer"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}]
    with get_client(sync_client=True) as client:
        watcher = client.read_deployment_by_name("xfer-monitor/monitor")
    assert watcher.entrypoint == "flows/monitor.py:monitor" and watcher.work_pool_name == "xfer"
    assert [s.schedule.cron for s in watcher.schedules] == ["0 * * * *"]
    assert watcher.parameters == {"root": ".", "incoming": "incoming"}
    assert watcher.pull_steps == deployment.pull_steps
