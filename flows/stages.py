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
from tasks.split import split
from xfer.config import ConfigError, load_params
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


@flow(name="fetch")
def fetch_flow(root: str = ".") -> dict:
    return _run_stage("fetch", root)


@flow(name="split")
def split_flow(root: str = ".") -> dict:
    return _run_stage("split", root)


@flow(name="features")
def features_flow(root: str = ".") -> dict:
    return _run_stage("features", root)


@flow(name="head")
def head_flow(root: str = ".") -> dict:
    return _run_stage("head", root)


@flow(name="finetune")
def finetune_flow(root: str = ".") -> dict:
    return _run_stage("finetune", root)


@flow(name="evaluate")
def evaluate_flow(root: str = ".") -> dict:
    return _run_stage("evaluate", root)


STAGE_FLOWS = {
    "fetch": fetch_flow,
    "split": split_flow,
    "features": features_flow,
    "head": head_flow,
    "finetune": finetune_flow,
    "evaluate": evaluate_flow,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--root", default=".", help="project root holding params.yaml and data/ (default: .)")
    args = parser.parse_args(argv)
    try:
        load_params(Layout(Path(args.root)).params)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = STAGE_FLOWS[args.stage](root=args.root)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
