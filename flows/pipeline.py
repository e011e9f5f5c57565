"""The whole chain as one Prefect flow, in one process.

    python -m flows.pipeline [--root .]

Runs the same stage flows, in the same order, as `dvc repro` (the optional
stages params.yaml switches on included), and writes the
same files. One MLflow pipeline run groups this execution's stage runs, in
the project's store or the one XFER_TRACKING_URI names. It holds the project's
lock (<root>/.xfer.lock) while it runs, as each `dvc repro` stage does: a
second run of the project exits 75, naming the pid of the one in progress.
Like each stage's, its flow run carries its process in a tag, and the next
pipeline run marks CRASHED the pipeline runs whose process has died.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prefect import flow

from flows.stages import BUSY_EXIT, STAGE_FLOWS, check_params, claim_and_crash_orphans
from tasks import tracking
from tasks.prefect_server import start_temporary_server
from xfer.config import load_params
from xfer.contract import enabled_stages
from xfer.layout import Layout
from xfer.locks import LockedError, project_lock

PIPELINE_FLOW = "xfer-pipeline"


@flow(name=PIPELINE_FLOW)
def pipeline(root: str = ".") -> dict:
    with project_lock(root):
        # A pipeline killed before (SIGKILL, the OOM killer) left its flow run RUNNING: marked CRASHED now.
        claim_and_crash_orphans(PIPELINE_FLOW)
        return _pipeline(root)


def _pipeline(root: str) -> dict:
    layout = Layout(Path(root))
    params = load_params(layout.params)
    experiment_id = tracking.use_store(layout, params.mlflow.experiment)
    git = tracking.git_state(layout.root)
    run_id = tracking.start_pipeline_run(layout, params, experiment_id, tracking.pipeline_key(params, git["git_commit"]), git)
    previous = os.environ.get(tracking.PIPELINE_RUN_ENV)
    os.environ[tracking.PIPELINE_RUN_ENV] = run_id
    try:
        # The chain, and the optional stages params.yaml switches on, in dvc.yaml's order.
        results = {stage: STAGE_FLOWS[stage](root=root) for stage in enabled_stages(params.model_dump(mode="json"))}
    finally:
        if previous is None:
            os.environ.pop(tracking.PIPELINE_RUN_ENV, None)
        else:
            os.environ[tracking.PIPELINE_RUN_ENV] = previous
    return {"mlflow_pipeline_run": run_id, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    if not check_params(args.root):
        return 2
    try:
        tracking.team_tracking_uri()
    except tracking.TrackingURIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with project_lock(args.root):  # before Prefect starts: a busy project is refused in a second
            start_temporary_server()  # tied to this process: a killed pipeline leaves no server behind
            result = pipeline(root=args.root)
    except LockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return BUSY_EXIT
    print(result["evaluate"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
