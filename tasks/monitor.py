"""The monitor's work around the core (xfer/monitor.py): the model, MLflow, the target pool, DVC.

Shared by `xfer monitor` (cli/monitor.py: a report) and the monitor flow
(flows/monitor.py: a report, and a retrain when one is wanted). Nothing here
imports Prefect: the flow hands `trigger_retrain` the function that starts a
deployment.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xfer.config import Params
from xfer.layout import Layout
from xfer.monitor import (
    EMBEDDINGS_DIR,
    TRIGGER_FILE,
    EmbeddingCache,
    MonitorError,
    Reference,
    add_to_pool,
    monitor_images,
    read_reference,
    trigger_decision,
    write_outputs,
)


@dataclass(frozen=True)
class Checked:
    report: dict
    written: dict[str, Path]
    run_id: str
    when: str


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def model_reference(model) -> Reference:
    """The reference window inside a loaded xfer pyfunc model; MonitorError when it has none."""
    bundle = getattr(model, "bundle_dir", None)
    if bundle is None:
        raise MonitorError("the model has no reference window (it was registered before xfer saved one, or not by xfer); run the evaluate stage again")
    return read_reference(Path(bundle))


def check_images(
    layout: Layout,
    params: Params,
    model,
    uri: str,
    images: list[Path],
    out: Path,
    store: str | None = None,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    model_key: str | None = None,
) -> Checked:
    """Test `images` against the loaded model's reference window; write the report, history and
    plots into `out` and log them to an MLflow run of kind `monitor` (in `store`, else the project's).
    Every error (MonitorError, DriftError, ImageReadError, PredictorError) comes before anything is written.
    `model_key` (the logged model's uuid) keys the embedding cache in <root>/monitor/embeddings."""
    reference = model_reference(model)
    cache = EmbeddingCache(layout.monitor / EMBEDDINGS_DIR, model_key) if model_key else None
    report, new = monitor_images(model.predictor, reference, images, params.monitor, params.seed, batch_size, on_batch=on_batch, cache=cache)
    when = now_utc().isoformat()
    written = write_outputs(out, report, reference, new, when, uri)
    run_id = log_to_mlflow(layout, store, params.mlflow.experiment, report, written, uri)
    return Checked(report, written, run_id, when)


def log_to_mlflow(layout: Layout, store: str | None, experiment: str, report: dict, written: dict, uri: str) -> str:
    """An MLflow run of kind `monitor` in the project's experiment (or `store`'s): the figures, the verdict and the files."""
    import mlflow

    from tasks.tracking import TAG_KIND, use_store

    if store is None:
        experiment_id = use_store(layout, experiment)
    else:
        mlflow.set_tracking_uri(store)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
    tags = {
        TAG_KIND: "monitor",
        "monitor.model": uri,
        "monitor.drift": str(report["drift"]).lower(),
        "monitor.retrain_wanted": str(report["retrain_wanted"]).lower(),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name="monitor", tags=tags) as run:
        metrics = {f"{name}.p_value": t["p_value"] for name, t in report["tests"].items()}
        metrics |= {f"{name}.statistic": t["statistic"] for name, t in report["tests"].items()}
        metrics |= {"images": report["images"], "accuracy.estimate": report["accuracy"]["estimate"], "accuracy.drop": report["accuracy"]["drop"]}
        mlflow.log_metrics(metrics)
        for path in written.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id


def tag_trigger(run_id: str, trigger: dict) -> None:
    """The trigger's verdict on the monitor run (in the store it was logged to)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, "monitor.retrain_triggered", str(trigger["triggered"]).lower())
    client.set_tag(run_id, "monitor.trigger_reason", trigger["reason"][:5000])
    if trigger.get("flow_run_id"):
        client.set_tag(run_id, "monitor.retrain_flow_run", trigger["flow_run_id"])


def read_trigger_state(path: Path) -> dict | None:
    """The last triggered retrain (trigger.json), or None; MonitorError when it is damaged."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        dt.datetime.fromisoformat(state["time"])
    except (ValueError, KeyError, TypeError) as err:
        raise MonitorError(f"{path} is damaged ({err}): it records the last triggered retrain; delete it to reset the cooldown") from None
    return state


def dvc_track(root: Path, folder: str) -> None:
    """`dvc add folder` in a DVC project (the pool is DVC-tracked); nothing elsewhere."""
    if not (root / ".dvc").is_dir():
        return
    proc = subprocess.run([sys.executable, "-m", "dvc", "add", folder], cwd=root, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        raise MonitorError(f"`dvc add {folder}` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")


def trigger_retrain(
    layout: Layout,
    params: Params,
    report: dict,
    images: list[Path],
    state_dir: Path,
    start_retrain: Callable[[str, dict], str],
    now: dt.datetime | None = None,
) -> dict:
    """When `trigger_decision` says so: copy the images into data.split.target_pool (a new batch,
    `dvc add`ed), start the retrain deployment (`start_retrain(name, parameters)` -> its flow run id)
    and record it in `state_dir`/trigger.json, which starts the cooldown. The verdict, as a dict.

    A failed `dvc add` takes the new batch out again; a failed start leaves the images in the pool
    (the next retrain reads them) and no record, so the next wanted retrain is not held back."""
    from xfer.io import write_json

    now = now or now_utc()
    state_path = Path(state_dir) / TRIGGER_FILE
    pool = params.data.split.target_pool
    decision = trigger_decision(report, params.monitor, pool, read_trigger_state(state_path), now)
    verdict = {"triggered": decision.trigger, "reason": decision.reason, "pool_images_added": 0, "flow_run_id": None}
    if not decision.trigger:
        return verdict
    from xfer.data.split import check_pool

    folder = check_pool(pool, layout.root)
    batch = f"{now.strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"
    added = add_to_pool(images, folder, batch)
    try:
        dvc_track(layout.root, pool)
    except MonitorError:
        if added:
            shutil.rmtree(folder / batch, ignore_errors=True)
        raise
    deployment = params.monitor.retrain_deployment
    flow_run_id = start_retrain(deployment, {"root": str(layout.root.resolve())})
    record = {"time": now.isoformat(), "deployment": deployment, "flow_run_id": flow_run_id, "pool_batch": f"{pool}/{batch}" if added else None}
    record["pool_images_added"] = len(added)
    write_json(state_path, record)
    return verdict | {"pool_images_added": len(added), "flow_run_id": flow_run_id, "deployment": deployment}
