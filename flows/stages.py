"""One Prefect flow per DVC stage: what `dvc.yaml` runs.

    python -m flows.stages <stage> [--root .]
    python -m flows.stages --check [--root .]    check params.yaml for every stage, run nothing

A stage process imports its own task module (named in xfer/contract.py) and
nothing of the other stages', so it starts fast and depends, for DVC, on the
files it really loads. params.yaml is validated before the flow starts, with
the checks the contract names for that stage, so a bad value fails in well
under a second, before any output is touched; `--check` (run first by `make
run` and by the pipeline flow) applies every stage's checks, so a typo in a
later stage's params stops the first one.

A stage killed by SIGKILL leaves no trace its next run keeps: that run first
removes the temporary files and staging folders left in its outputs
(xfer/io.py), marks CRASHED the Prefect flow runs of the stage whose process
has died (each flow run carries its process in an `xfer.owner:` tag), and
tasks.tracking marks its orphaned MLflow runs FAILED. The temporary Prefect
server a stage process starts dies with it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from prefect import flow

from tasks.prefect_server import start_temporary_server
from tasks.tracking import check_local_store, team_tracking_uri
from xfer.config import load_params
from xfer.contract import ALL_STAGE_NAMES, ALL_STAGES, check_dvc_yaml, enabled_stages
from xfer.io import remove_leftovers
from xfer.layout import Layout
from xfer.locks import LockedError, project_lock
from xfer.procs import is_dead, process_identity

# Exit status of a stage or pipeline refused because another run of the project holds
# its lock (EX_TEMPFAIL: try again later); bad params exit 2.
BUSY_EXIT = 75
# A flow run's tag naming its process: "xfer.owner:<host>:<pid>:<start time>".
OWNER_TAG = "xfer.owner:"


def resolve(target: str):
    """The object a contract string "module:name" names, imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _run_stage(stage: str, root: str) -> dict:
    layout = Layout(Path(root))
    params = load_params(layout.params)
    claim_and_crash_orphans(stage)
    # Its outputs, and checkpoints/ (where finetune, translate and evaluate's folds save as they train):
    # with the project's lock held no other stage writes there, so a temporary file in it is a killed write's.
    remove_leftovers([layout.root / out for out in (*ALL_STAGES[stage].outs, *ALL_STAGES[stage].metrics)] + [layout.checkpoints])
    return resolve(ALL_STAGES[stage].task)(layout, params)


def owner_tag() -> str:
    me = process_identity()
    return f"{OWNER_TAG}{me['host']}:{me['pid']}:{me['start']}"


def claim_and_crash_orphans(stage: str) -> list[str]:
    """Tag this flow run with its process; mark CRASHED the RUNNING runs of the flow named `stage`
    (a stage, or the pipeline flow) whose process died.

    Returns the ids of the flow runs marked. A run without the tag (or of
    another host, or of a live process) is left alone.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    crashed = []
    with get_client(sync_client=True) as client:
        if flow_run.id:
            current = client.read_flow_run(flow_run.id)
            client.update_flow_run(flow_run.id, tags=[*current.tags, owner_tag()])
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[stage])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
        )
        for run in running:
            owner = next((t.removeprefix(OWNER_TAG) for t in run.tags if t.startswith(OWNER_TAG)), None)
            if owner is None or str(run.id) == str(flow_run.id):
                continue
            host, pid, start = ([""] * 2 + owner.rsplit(":", 2))[-3:]
            if is_dead(host, pid, start):
                client.set_flow_run_state(run.id, Crashed(message=f"its process {pid} died (found by the next {stage} run)"), force=True)
                crashed.append(str(run.id))
    return crashed


def _stage_flow(stage: str):
    @flow(name=stage)
    def stage_flow(root: str = ".") -> dict:
        with project_lock(root):
            return _run_stage(stage, root)

    stage_flow.__doc__ = f"The {stage} stage: {ALL_STAGES[stage].task} on the project at `root`."
    return stage_flow


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in ALL_STAGE_NAMES}
# Importable names, for `prefect deploy flows/stages.py:<stage>_flow`.
fetch_flow = STAGE_FLOWS["fetch"]
split_flow = STAGE_FLOWS["split"]
features_flow = STAGE_FLOWS["features"]
head_flow = STAGE_FLOWS["head"]
finetune_flow = STAGE_FLOWS["finetune"]
evaluate_flow = STAGE_FLOWS["evaluate"]


def check_params(root: str, stages: tuple[str, ...] | None = None) -> bool:
    """Validate params.yaml for `stages` (default: the chain, and the optional stages it switches on);
    print the problem and return False if invalid.

    Beyond the schema: dvc.yaml lists what params.yaml switches on (an optional
    stage, a switched dep), each stage's checks from the contract run (the
    backbone name and weights file, a local dataset path, the feature runner),
    and the tracking store XFER_TRACKING_URI names.
    """
    try:
        params = load_params(Layout(Path(root)).params)
        data = params.model_dump(mode="json")
        stages = enabled_stages(data) if stages is None else stages
        # A stage or a dep params.yaml switches on that dvc.yaml lacks: DVC would skip it.
        check_dvc_yaml(Path(root), data, stages)
        checks = dict.fromkeys(check for stage in stages for check in ALL_STAGES[stage].checks)
        for check in checks:
            resolve(check)(params, Path(root))
        if team_tracking_uri() is None:
            # Empty or damaged: stop here, before any stage work (an old schema is migrated by the stage).
            check_local_store(Layout(Path(root)).mlflow_db, migrate=False)
    except ValueError as err:  # ConfigError and every check's error name the bad value
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", choices=ALL_STAGE_NAMES)
    parser.add_argument("--check", action="store_true", help="check params.yaml for every stage and exit")
    parser.add_argument("--root", default=".", help="project root holding params.yaml and data/ (default: .)")
    args = parser.parse_args(argv)
    if args.check == bool(args.stage):
        parser.error("give one stage, or --check")
    if args.check:
        if not check_params(args.root):
            return 2
        print(f"{Layout(Path(args.root)).params}: valid for every stage")
        return 0
    if not check_params(args.root, (args.stage,)):
        return 2
    try:
        with project_lock(args.root):  # before Prefect starts: a busy project is refused in a second
            start_temporary_server()
            result = STAGE_FLOWS[args.stage](root=args.root)
    except LockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return BUSY_EXIT
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
