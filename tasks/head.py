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
    logger = get_run_logger()
    logger.info("head: %s, method %s, selection %s", cfg.kind, cfg.method, cfg.selection)
    with stage_run("head", layout, params) as run:
        log_epoch = run.epoch_logger("head")
        with run.work():
            result = train_heads(
                features_dir=layout.features_current,
                member_features_dir=layout.features_members,
                manifest_path=layout.manifest,
                head_dir=layout.head_dir,
                pick_path=layout.head_pick,
                plot_dir=layout.stage_plots("head"),
                metrics_path=layout.metrics("head"),
                params=params,
                on_epoch=log_epoch,
                on_candidate=lambda i, n, name, rec: logger.info(
                    "head.method auto: candidate %d/%d %s trained (epoch %d kept, source val %.3f)", i, n, name, rec["best_epoch"], rec["source_val_accuracy"]
                ),
            )
        summary = result.summary
        search = summary.get("search")
        for epoch, record in enumerate(result.history, start=1):
            # A search streams nothing while it runs; ensv is scored after the last epoch.
            log_epoch(epoch, record if search else {k: v for k, v in record.items() if k == "validator_ensv"})
        tags = {"head.method": summary["method"], "head.selection": cfg.selection, "uses_target_labels": str(cfg.uses_target_labels).lower()}
        if search:
            for candidate in search["candidates"]:
                run.child_run(candidate["name"], {"method": candidate["method"]}, candidate)
            verdict = "adapted" if not search["guard"]["fell_back"] else "fell back to source_only"
            tags |= {"search.pick": search["pick"], "search.kept": search["kept"], "search.guard": verdict}
            logger.info("head.method auto: %s", search["why"])
            if search["warning"]:
                tags["search.warning"] = search["warning"]
                logger.warning("head.method auto: %s", search["warning"])
        run.set_tags(tags)
        run.log_metrics({k: v for k, v in summary.items() if k != "search"}, prefix="best.")
        run.log_artifact(layout.metrics("head"))
        run.log_artifact(result.tsne, "plots")
        run.log_artifact(result.curves, "plots")
        if result.importance is not None:
            run.log_artifact(result.importance, "plots")
    return {k: v for k, v in summary.items() if k not in ("proxy_a_distance", "validators", "search")}
