"""The monitor loop end to end, with a real Prefect server, MLflow store and DVC repo: the monitor flow
finds no drift in the target domain's own images, finds it in a shifted copy, adds those images to the
DVC-tracked target pool and starts exactly one retrain (a real flow run of a served deployment), whose
new model takes @champion only if it is better; a second wanted retrain within the cooldown is held."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, TINY_PARAMS
from PIL import Image, ImageOps
from test_dvc import make_repo, sh
from test_retrain import serve_retrain, wait_for_deployment

DEPLOYMENT = "xfer-retrain/loop-test"


def loop_params() -> dict:
    import copy

    params = copy.deepcopy(TINY_PARAMS)
    params["data"]["split"]["target_pool"] = "data/pool"
    # max_drop null: any significant drift wants a retrain. The tiny model's accuracy estimate on
    # inverted digits says little (it is confidently wrong); the drop rule has its own unit test.
    params["monitor"] |= {"min_images": 5, "max_drop": None, "cooldown_hours": 24.0, "retrain_deployment": DEPLOYMENT}
    return params


def run_monitor(root: Path, env: dict, incoming: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.monitor", "--root", str(root), "--incoming", incoming], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1 :] if not proc.stdout.startswith("{") else proc.stdout)


def copy_images(root: Path, paths: list[str], dest: Path, invert: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in paths:
        with Image.open(root / path) as img:
            (ImageOps.invert(img.convert("RGB")) if invert else img.convert("RGB")).save(dest / Path(path).name)


def wait_for_flow_run(flow_run_id: str, timeout: float = 900):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def deployment_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


@pytest.mark.slow
def test_drift_adds_images_to_the_pool_and_triggers_one_retrain_within_the_cooldown(tmp_path, prefect_api):
    import mlflow
    from mlflow.tracking import MlflowClient

    root = tmp_path / "project"
    root.mkdir()
    env, dvc = make_repo(root, loop_params(), prefect_api)
    shutil.copytree(REPO / "cli", root / "cli", ignore=shutil.ignore_patterns("__pycache__"))
    sh([sys.executable, "-m", "xfer.contract", "--write"], root, env)  # data/pool joins the deps of the stages reading target images
    (root / "data" / "pool").mkdir(parents=True)
    sh([dvc, "add", "data/pool"], root, env)
    server = serve_retrain(root, env, "loop-test")
    try:
        wait_for_deployment(DEPLOYMENT, server)
        first = wait_for_flow_run(_start(DEPLOYMENT, str(root)))
        assert first.state.is_completed(), first.state
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        client = MlflowClient()
        assert str(client.get_model_version_by_alias("xfer", "champion").version) == "1"
        manifest = pd.read_csv(root / "data/splits/manifest.csv")
        assert not manifest.path.str.startswith("data/pool/").any()
        test_rows = manifest[(manifest.role == "target") & (manifest.split == "test")].path.tolist()

        # The target domain's own images: no drift, nothing added, nothing started.
        copy_images(root, test_rows[:15], root / "incoming" / "same", invert=False)
        calm = run_monitor(root, env, "incoming")
        assert calm["status"] == "tested" and calm["new_images"] == 15 and not calm["drift"] and not calm["triggered"], calm
        assert calm["reason"] == "no retrain wanted: no drift" and len(deployment_runs(DEPLOYMENT)) == 1
        # Run again with nothing new: it waits, testing nothing.
        assert run_monitor(root, env, "incoming") == {"status": "waiting", "new_images": 0}

        # A shift: the same digits inverted. Drift, so the images join the pool and one retrain starts.
        copy_images(root, test_rows[:15], root / "incoming" / "inverted", invert=True)
        shifted = run_monitor(root, env, "incoming")
        assert shifted["new_images"] == 15 and shifted["drift"] and shifted["triggered"], shifted
        assert shifted["pool_images_added"] == 15 and shifted["deployment"] == DEPLOYMENT
        retrain = wait_for_flow_run(shifted["flow_run_id"])
        assert retrain.state.is_completed(), retrain.state
        assert retrain.deployment_id is not None and retrain.parameters["root"] == str(root)

        pool_files = sorted((root / "data" / "pool").rglob("*.png"))
        assert len(pool_files) == 15
        tracked = json.loads(json.dumps(__import__("yaml").safe_load((root / "data" / "pool.dvc").read_text())))
        assert tracked["outs"][0]["nfiles"] == 15  # DVC tracks the pool as it is now
        manifest = pd.read_csv(root / "data/splits/manifest.csv")
        pooled = manifest[manifest.path.str.startswith("data/pool/")]
        assert len(pooled) == 15 and set(pooled.split) == {"unlabeled"} and set(pooled.role) == {"target"} and set(pooled.label) == {-1}
        assert manifest[(manifest.role == "target") & (manifest.split == "test")].path.tolist() == test_rows  # evaluation set unchanged

        # The retrain registered version 2; it holds @champion only if its target val figure is strictly higher.
        versions = sorted(client.search_model_versions("name = 'xfer'"), key=lambda v: int(v.version))
        assert [str(v.version) for v in versions] == ["1", "2"]
        decision = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=versions[1].run_id, artifact_path="promotion.json")).read_text())
        first_figure = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=versions[0].run_id, artifact_path="promotion.json")).read_text())[
            "challenger"
        ]
        assert decision["champion"] == first_figure and decision["promoted"] == (decision["challenger"] > first_figure)
        champion = str(client.get_model_version_by_alias("xfer", "champion").version)
        assert champion == ("2" if decision["challenger"] > first_figure else "1")

        # More shifted images within the cooldown: a retrain is wanted again, but none starts.
        copy_images(root, test_rows[15:], root / "incoming" / "inverted_more", invert=True)
        held = run_monitor(root, env, "incoming")
        assert held["drift"] and not held["triggered"] and "within monitor.cooldown_hours 24.0" in held["reason"], held
        assert held["pool_images_added"] == 0 and len(sorted((root / "data" / "pool").rglob("*.png"))) == 15
        assert len(deployment_runs(DEPLOYMENT)) == 2  # the first run, and exactly one the monitor started

        # MLflow holds a monitor run per test with the trigger's verdict; the Prefect artifact says it too.
        runs = client.search_runs([client.get_experiment_by_name(loop_params()["mlflow"]["experiment"]).experiment_id], "tags.`xfer.kind` = 'monitor'")
        assert sorted(r.data.tags["monitor.retrain_triggered"] for r in runs) == ["false", "false", "true"]
        assert (root / "monitor" / "history.csv").read_text().count("\n") == 4
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as prefect:
            artifact = prefect.read_latest_artifacts()
        texts = [a.data for a in artifact if a.key == "xfer-monitor"]
        assert texts and "within monitor.cooldown_hours" in texts[0] and "| mmd |" in texts[0]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _start(name: str, root: str) -> str:
    from prefect.deployments import run_deployment

    return str(run_deployment(name, parameters={"root": root}, timeout=0).id)


def test_the_flow_waits_without_images_refuses_a_second_run_and_names_a_missing_folder(tmp_path, prefect_api, capsys):
    """Scheduled (the flow itself): no incoming folder yet, or too few new images, is a wait that tests
    and writes nothing; a run finding another at work stops at once. From the command line a missing
    folder is an error."""
    from helpers import write_params

    from flows.monitor import main, monitor
    from xfer.locks import LockedError

    write_params(tmp_path, TINY_PARAMS)
    assert monitor(root=str(tmp_path), incoming="incoming") == {"status": "waiting", "new_images": 0}
    assert main(["--root", str(tmp_path)]) == 2
    assert f"the incoming folder {tmp_path / 'incoming'} does not exist" in capsys.readouterr().err
    (tmp_path / "incoming").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / "incoming" / f"{i}.png")
    assert monitor(root=str(tmp_path), incoming="incoming") == {"status": "waiting", "new_images": 3}  # min_images 30
    assert sorted(p.name for p in (tmp_path / "monitor").iterdir()) == [".lock"]  # nothing tested, nothing recorded

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from xfer.locks import file_lock\nwith file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(tmp_path / "monitor" / ".lock"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"another monitor run of this project is working \\(pid {holder.pid}\\)"):
            monitor(root=str(tmp_path), incoming="incoming")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("module", ["flows.retrain", "flows.monitor"])
def test_a_bad_schedule_is_refused_before_anything_runs(module, capsys):
    import importlib

    main = importlib.import_module(module).main
    for argv, message in (
        (["--cron", "0 * * * *"], "--cron needs --serve"),
        (["--serve", "--cron", "every hour"], "--cron 'every hour' is not a valid cron expression (five fields"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
