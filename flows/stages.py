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
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from prefect import flow

from tasks.tracking import check_local_store, team_tracking_uri
from xfer.config import load_params
from xfer.contract import STAGE_NAMES, STAGES
from xfer.layout import Layout
from xfer.locks import LockedError, project_lock

# Exit status of a stage or pipeline refused because another run of the project holds
# its lock (EX_TEMPFAIL: try again later); bad params exit 2.
BUSY_EXIT = 75


def resolve(target: str):
    """The object a contract string "module:name" names, imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _run_stage(stage: str, root: str) -> dict:
    layout = Layout(Path(root))
    params = load_params(layout.params)
    return resolve(STAGES[stage].task)(layout, params)


def _stage_flow(stage: str):
    @flow(name=stage)
    def stage_flow(root: str = ".") -> dict:
        with project_lock(root):
            return _run_stage(stage, root)

    stage_flow.__doc__ = f"The {stage} stage: {STAGES[stage].task} on the project at `root`."
    return stage_flow


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGE_NAMES}
# Importable names, for `prefect deploy flows/stages.py:<stage>_flow`.
fetch_flow = STAGE_FLOWS["fetch"]
split_flow = STAGE_FLOWS["split"]
features_flow = STAGE_FLOWS["features"]
head_flow = STAGE_FLOWS["head"]
finetune_flow = STAGE_FLOWS["finetune"]
evaluate_flow = STAGE_FLOWS["evaluate"]


def check_params(root: str, stages: tuple[str, ...] = STAGE_NAMES) -> bool:
    """Validate params.yaml for `stages` (default: all); print the problem and return False if invalid.

    Beyond the schema, each stage's checks from the contract run (the backbone
    name and weights file, a local dataset path, the feature runner), and the
    tracking store XFER_TRACKING_URI names.
    """
    try:
        params = load_params(Layout(Path(root)).params)
        checks = dict.fromkeys(check for stage in stages for check in STAGES[stage].checks)
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
    parser.add_argument("stage", nargs="?", choices=STAGE_NAMES)
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
            result = STAGE_FLOWS[args.stage](root=args.root)
    except LockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return BUSY_EXIT
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
