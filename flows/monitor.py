"""Watch an incoming folder: drift in the images it receives, and a retrain when one is wanted.

    python -m flows.monitor [--root .] [--incoming incoming] [--model URI]          once, now
    python -m flows.monitor --serve --cron "0 * * * *" [--root .] [--incoming ...]  served on a schedule
    prefect deploy --name monitor                                                   to a work pool (prefect.yaml)

Each run:
1. lists the images in the incoming folder that no earlier run tested (by
   content: <root>/monitor/checked.csv); fewer than `monitor.min_images` new
   ones and it waits for the next run, testing nothing;
2. tests them as `xfer monitor` does (tasks/monitor.py): the champion's
   reference window against them, the report, history and plots in
   <root>/monitor/, an MLflow run of kind `monitor`;
3. when retraining is wanted (drift, and an estimated accuracy drop above
   `monitor.max_drop`) and the last triggered retrain is older than
   `monitor.cooldown_hours`: copies the images into `data.split.target_pool`
   (DVC-tracked; they join the target unlabeled split, never val or test) and
   starts `monitor.retrain_deployment` (flows/retrain.py), whose evaluate
   stage promotes the new model only if it beats the champion;
4. publishes the verdict as a Prefect markdown artifact (key `xfer-monitor`).

One run at a time per project (<root>/monitor/.lock): a run that finds
another working exits at once, testing nothing. A scheduled run finding no
incoming folder yet waits, like one finding too few images; asked for from
the command line, a missing folder is an error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

import tasks  # noqa: F401  (offline defaults before prefect is imported)
from tasks.monitor import Checked, check_images, tag_trigger, trigger_retrain
from tasks.tracking import default_model_uri, load_model, tracking_uri
from xfer.config import load_params
from xfer.layout import Layout
from xfer.locks import LockedError, file_lock
from xfer.monitor import CHECKED_FILE, MonitorError, record_checked, summary_line, unchecked

MONITOR_FLOW = "xfer-monitor"
ARTIFACT_KEY = "xfer-monitor"
DEFAULT_INCOMING = "incoming"
DEFAULT_DEPLOYMENT = "monitor"


def missing_folder(folder: Path) -> str:
    return f"the incoming folder {folder} does not exist: create it and put the new images there (--incoming names another)"


def incoming_images(folder: Path) -> list[Path]:
    """The images under the incoming folder; none yet, or no folder yet, is fine: the run waits."""
    from xfer.predictor import PredictorError, image_files

    if not folder.is_dir():  # a schedule served before anything arrived (`make servers`): nothing to test
        return []
    try:
        return image_files([folder], [])
    except PredictorError:  # no images yet
        return []


def start_deployment(name: str, parameters: dict) -> str:
    """Start a run of the deployment `name` without waiting for it; its flow run id."""
    from prefect.deployments import run_deployment

    return str(run_deployment(name, parameters=parameters, timeout=0).id)


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(root: str, images: list[Path], model: str | None) -> Checked:
    from xfer.data.formats import set_max_image_pixels

    layout = Layout(Path(root))
    params = load_params(layout.params)
    set_max_image_pixels(params.data.max_image_pixels)  # a decompression bomb is refused, as by `xfer monitor`
    uri = model or default_model_uri(layout)
    loaded = load_model(uri, tracking_uri(layout))
    return check_images(layout, params, loaded.unwrap_python_model(), uri, images, layout.monitor, model_key=loaded.metadata.model_uuid)


@task(name="trigger-retrain", cache_policy=NO_CACHE)
def trigger(root: str, report: dict, images: list[Path]) -> dict:
    layout = Layout(Path(root))
    return trigger_retrain(layout, load_params(layout.params), report, images, layout.monitor, start_deployment)


def markdown(checked: Checked | None, verdict: dict | None, waiting: str | None = None) -> str:
    if checked is None:
        return f"# xfer monitor\n\n{waiting}\n"
    report = checked.report
    lines = [
        "# xfer monitor",
        "",
        f"**{'DRIFT' if report['drift'] else 'No drift'}** in {report['images']} new images against "
        f"{report['reference_rows']} reference rows, at {checked.when}.",
        "",
        "| test | statistic | p-value | drift (p < alpha per test) |",
        "|---|---|---|---|",
    ]
    for name, test in report["tests"].items():
        lines.append(f"| {name} | {test['statistic']:.4g} | {test['p_value']:.3g} | {'yes' if test['drift'] else 'no'} |")
    accuracy = report["accuracy"]
    lines += [
        "",
        f"alpha {report['alpha']} ({report['alpha_per_test']:.3g} per test).",
        "",
        f"Estimated accuracy on the new images: **{accuracy['estimate']:.3f}**; on target val {accuracy['target_val']:.3f} "
        f"(drop {accuracy['drop']:+.3f}, monitor.max_drop {report['max_drop']}). {accuracy['method']}.",
        "",
        *(
            [f"{report['ood']['flagged']} of the images flagged out of distribution (about {report['ood']['expected_share']:.0%} of in-domain images are).", ""]
            if "ood" in report
            else []
        ),
        f"**{verdict['reason']}**"
        + (f" (flow run {verdict['flow_run_id']}, {verdict['pool_images_added']} images added to the target pool)" if verdict["triggered"] else ""),
        "",
        f"Files: {', '.join(f'`{p}`' for p in checked.written.values())}; MLflow run `{checked.run_id}`.",
    ]
    return "\n".join(lines) + "\n"


@flow(name=MONITOR_FLOW)
def monitor(root: str = ".", incoming: str = DEFAULT_INCOMING, model: str | None = None) -> dict:
    """Test the incoming folder's new images for drift; trigger a retrain when one is wanted."""
    logger = get_run_logger()
    layout = Layout(Path(root).resolve())
    params = load_params(layout.params)
    state_dir = layout.monitor
    folder = Path(incoming) if Path(incoming).is_absolute() else layout.root / incoming
    busy = "another monitor run of this project is working (pid {}); this one tests nothing".format
    with file_lock(state_dir / ".lock", wait=False, busy=busy):
        new, digests = unchecked(incoming_images(folder), state_dir / CHECKED_FILE)
        if len(new) < params.monitor.min_images:
            waiting = f"{len(new)} new image(s) in {folder}; waiting for monitor.min_images {params.monitor.min_images} before testing"
            if not folder.is_dir():
                waiting = f"{missing_folder(folder)}; nothing to test"
            logger.info(waiting)
            create_markdown_artifact(markdown=markdown(None, None, waiting), key=ARTIFACT_KEY, description="drift in new images")
            return {"status": "waiting", "new_images": len(new)}
        checked = check_drift(str(layout.root), new, model)
        logger.info(summary_line(checked.report))
        verdict = trigger(str(layout.root), checked.report, new)
        logger.info(verdict["reason"])
        tag_trigger(checked.run_id, verdict)
        record_checked(state_dir / CHECKED_FILE, new, digests, checked.when)
        create_markdown_artifact(markdown=markdown(checked, verdict), key=ARTIFACT_KEY, description="drift in new images, and the retrain verdict")
    return {"status": "tested", "new_images": len(new), "drift": checked.report["drift"], "retrain_wanted": checked.report["retrain_wanted"], **verdict}


def main(argv: list[str] | None = None) -> int:
    from flows.serve import add_serve_arguments, check_serve_arguments
    from flows.stages import check_params
    from tasks.prefect_server import start_temporary_server

    parser = argparse.ArgumentParser(prog="python -m flows.monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--incoming", default=DEFAULT_INCOMING, help=f"folder receiving new images, relative to the root (default: {DEFAULT_INCOMING})")
    parser.add_argument("--model", help="MLflow model URI (default: models:/<registry.name>@champion)")
    add_serve_arguments(parser, DEFAULT_DEPLOYMENT, '"0 * * * *" (hourly)')
    args = parser.parse_args(argv)
    root = str(Path(args.root).resolve())
    check_serve_arguments(parser, args)
    if not check_params(root):
        return 2
    parameters = {"root": root, "incoming": args.incoming, "model": args.model}
    folder = Path(args.incoming) if Path(args.incoming).is_absolute() else Path(root) / args.incoming
    if not args.serve and not folder.is_dir():  # asked for now, by a person: say so (a schedule waits instead)
        print(f"error: {missing_folder(folder)}", file=sys.stderr)
        return 2
    start_temporary_server()  # without PREFECT_API_URL: tied to this process, gone with it even after a SIGKILL
    if args.serve:
        monitor.serve(name=args.name, cron=args.cron, parameters=parameters)
        return 0
    try:
        result = monitor(**parameters)
    except (MonitorError, LockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
