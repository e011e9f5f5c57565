"""head stage: a classifier head trained on cached source features."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer import features as feats
from xfer.config import Params
from xfer.data.split import class_names, read_manifest
from xfer.heads import save_head, train_head
from xfer.io import write_json
from xfer.layout import Layout


@task(name="head", cache_policy=NO_CACHE)
def head(layout: Layout, params: Params) -> dict:
    with stage_run("head", layout, params, ["seed", "head"]) as run:
        with run.work():
            fs = feats.load_current(layout.features)
            names = class_names(read_manifest(layout.manifest))
            train = fs.select("source", "train")
            val = fs.select("source", "val")
            monitor = {"target_val": fs.select("target", "val")}
            model, history = train_head(params.head, train, val, len(names), params.seed, monitor, run.epoch_logger("head"))
            save_head(layout.head_dir, model, params.head, fs.features.shape[1], names, fs.meta["key"])
            best = max(history, key=lambda r: r["val_accuracy"])
            summary = {"best_epoch": history.index(best) + 1, "source_val_accuracy": best["val_accuracy"], "target_val_accuracy": best["target_val_accuracy"], "epochs": len(history)}
            write_json(layout.metrics("head"), summary)
        run.log_metrics(summary, prefix="best.")
        run.log_artifact(layout.metrics("head"))
    return summary
