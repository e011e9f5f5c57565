"""head stage: train the heads (xfer/head_stage.py), then track them."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.head_stage import train_heads
from xfer.layout import Layout


@task(name="head", cache_policy=NO_CACHE)
def head(layout: Layout, params: Params) -> dict:
    cfg = params.head
    get_run_logger().info("head: %s, method %s, selection %s", cfg.kind, cfg.method, cfg.selection)
    with stage_run("head", layout, params) as run:
        with run.work():
            result = train_heads(
                features_dir=layout.features_current,
                member_features_dir=layout.features_members,
                manifest_path=layout.manifest,
                head_dir=layout.head_dir,
                plot_dir=layout.stage_plots("head"),
                metrics_path=layout.metrics("head"),
                params=params,
                on_epoch=run.epoch_logger("head"),
            )
        run.set_tags({"head.method": cfg.method, "head.selection": cfg.selection, "uses_target_labels": str(cfg.uses_target_labels).lower()})
        run.log_metrics(result.summary, prefix="best.")
        run.log_artifact(layout.metrics("head"))
        run.log_artifact(result.tsne, "plots")
        run.log_artifact(result.curves, "plots")
    return {k: v for k, v in result.summary.items() if k != "proxy_a_distance"}
