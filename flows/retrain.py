"""Scheduled retraining: the latest data, the pipeline again, the registry's promotion rule.

    python -m flows.retrain [--root .] [--force]                      once, now
    python -m flows.retrain --serve --cron "0 3 * * 1" [--root .]     served on a schedule
    prefect deploy --name weekly                                      to a work pool (prefect.yaml)

1. `dvc pull` when the project has a DVC remote (data pushed by others);
2. `dvc repro` (`--force`: every stage again) in a DVC project, or the
   pipeline flow elsewhere; the evaluate stage registers the new model and
   applies the promotion rule (tasks/registry.py);
3. the flow's result is the promotion decision, or why there was none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import tasks  # noqa: F401  (offline defaults before prefect is imported)
from flows.pipeline import pipeline
from flows.serve import add_serve_arguments, check_serve_arguments
from flows.stages import check_params
from tasks.prefect_server import start_temporary_server
from tasks.tracking import TrackingURIError, team_tracking_uri
from xfer.config import load_params
from xfer.layout import Layout

DEFAULT_DEPLOYMENT = "scheduled"


def is_dvc_project(root: Path) -> bool:
    return (root / ".dvc").is_dir()


def run_logged(command: list[str], root: Path) -> str:
    """Run `command` in `root`; raise with its output if it fails."""
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, env={**os.environ, **prefect_api_env()})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def prefect_api_env() -> dict[str, str]:
    """The API this flow talks to, for the stage processes `dvc repro` starts."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": url} if url else {}


@task(name="pull-data", retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def pull_data(root: Path) -> str:
    """`dvc pull` from the project's DVC remote, if it has one."""
    if not is_dvc_project(root):
        return "not a DVC project: the data in the workspace"
    if not run_logged([sys.executable, "-m", "dvc", "remote", "list"], root).strip():
        return "no DVC remote: the data in the workspace"
    run_logged([sys.executable, "-m", "dvc", "pull"], root)
    return "pulled from the DVC remote"


@task(name="reproduce", cache_policy=NO_CACHE)
def reproduce(root: Path, force: bool) -> str:
    """`dvc repro` in the project (each stage reports its own flow run)."""
    out = run_logged([sys.executable, "-m", "dvc", "repro", *(["--force"] if force else [])], root)
    get_run_logger().info("dvc repro:\n%s", out[-4000:])
    return out


def latest_promotion(layout: Layout, since_ms: int) -> dict | None:
    """The promotion decision of a version registered after `since_ms`, if any."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import tracking_uri

    params = load_params(layout.params)
    if not params.registry.enabled:
        return None
    mlflow.set_tracking_uri(tracking_uri(layout))
    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"name = '{params.registry.name}'") if v.creation_timestamp >= since_ms]
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    path = mlflow.artifacts.download_artifacts(run_id=newest.run_id, artifact_path="promotion.json")
    return json.loads(Path(path).read_text())


@flow(name="xfer-retrain")
def retrain(root: str = ".", force: bool = False) -> dict:
    """Pull data, rerun the pipeline, apply the promotion rule; return the decision."""
    logger = get_run_logger()
    layout = Layout(Path(root).resolve())
    started_ms = int(time.time() * 1000)
    if not check_params(str(layout.root)):
        raise ValueError(f"{layout.params} is invalid (see the error above); nothing was run")
    team_tracking_uri()  # a bad XFER_TRACKING_URI stops here, before the pull and any stage
    data = pull_data(layout.root)
    logger.info(data)
    if is_dvc_project(layout.root):
        reproduce(layout.root, force)
    else:
        pipeline(root=str(layout.root))
    decision = latest_promotion(layout, started_ms)
    if decision is None:
        logger.info("no new model version: nothing changed (run with force=True to retrain anyway)")
        return {"data": data, "promotion": None}
    logger.info("version %s: %s (%s)", decision["version"], decision["alias"], decision["reason"])
    return {"data": data, "promotion": decision}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--force", action="store_true", help="rerun every stage even if nothing changed")
    add_serve_arguments(parser, DEFAULT_DEPLOYMENT, '"0 3 * * 1" (Mondays 03:00)')
    args = parser.parse_args(argv)
    root = str(Path(args.root).resolve())
    check_serve_arguments(parser, args)
    if not check_params(root):
        return 2
    try:
        team_tracking_uri()
    except TrackingURIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start_temporary_server()  # without PREFECT_API_URL: tied to this process, gone with it even after a SIGKILL
    if args.serve:
        retrain.serve(name=args.name, cron=args.cron, parameters={"root": root, "force": args.force})
        return 0
    print(json.dumps(retrain(root=root, force=args.force), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
