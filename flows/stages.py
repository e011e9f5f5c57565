"""One Prefect flow per DVC stage: what `dvc.yaml` runs.

    python -m flows.stages <stage> [--params params.yaml] [--root .]

params.yaml is validated before the flow starts, so a bad value fails in
well under a second, before any output is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow

from tasks.evaluate import evaluate
from tasks.features import features
from tasks.fetch import fetch
from tasks.finetune import finetune
from tasks.head import head
from tasks.runners import RunnerError, check_runner
from tasks.tracking import TrackingURIError, team_tracking_uri
from tasks.split import split
from xfer.backbones import BackboneError, check_model_name, resolve_weights
from xfer.config import ConfigError, load_params
from xfer.data.sources import SourceError, check_source, resolve_source
from xfer.layout import Layout

STAGE_TASKS = {
    "fetch": fetch,
    "split": split,
    "features": features,
    "head": head,
    "finetune": finetune,
    "evaluate": evaluate,
}
STAGES = tuple(STAGE_TASKS)


def _run_stage(stage: str, root: str) -> dict:
    layout = Layout(Path(root))
    params = load_params(layout.params)
    return STAGE_TASKS[stage](layout, params)


def _stage_flow(stage: str):
    @flow(name=stage)
    def stage_flow(root: str = ".") -> dict:
        return _run_stage(stage, root)

    stage_flow.__doc__ = f"The {stage} stage: tasks/{stage}.py on the project at `root`."
    return stage_flow


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}
# Importable names, for `prefect deploy flows/stages.py:<stage>_flow`.
fetch_flow = STAGE_FLOWS["fetch"]
split_flow = STAGE_FLOWS["split"]
features_flow = STAGE_FLOWS["features"]
head_flow = STAGE_FLOWS["head"]
finetune_flow = STAGE_FLOWS["finetune"]
evaluate_flow = STAGE_FLOWS["evaluate"]


def check_params(root: str) -> bool:
    """Validate params.yaml before any flow starts; print the problem and return False if invalid.

    Beyond the schema, the backbone name, the weights file and a local dataset
    path are checked here, so a typo stops the first stage, not a later one
    after fetch and split.
    """
    try:
        params = load_params(Layout(Path(root)).params)
        for backbone in (params.backbone, *params.fusion.backbones):
            check_model_name(backbone.name)
            resolve_weights(backbone)
        check_source(resolve_source(params.data), Path(root))
        check_runner(params.features.runner)
        team_tracking_uri()
    except (ConfigError, BackboneError, SourceError, RunnerError, TrackingURIError) as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--root", default=".", help="project root holding params.yaml and data/ (default: .)")
    args = parser.parse_args(argv)
    if not check_params(args.root):
        return 2
    result = STAGE_FLOWS[args.stage](root=args.root)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
