"""evaluate stage: score every model (xfer/evaluate.py), then track, register and report it."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.registry import ModelRefused, log_refusal, refusal, register_and_promote
from tasks.report import publish_report
from tasks.tracking import stage_run
from xfer.config import Params
from xfer.evaluate import evaluate_models
from xfer.layout import Layout
from xfer.metrics import model_results


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(layout: Layout, params: Params) -> dict:
    with stage_run("evaluate", layout, params) as run:
        with run.work():
            scored = evaluate_models(
                manifest_path=layout.manifest,
                images_root=layout.root,
                features_dir=layout.features_current,
                member_features_dir=layout.features_members,
                head_dir=layout.head_dir,
                finetune_dir=layout.finetune_dir,
                metrics_path=layout.metrics("eval"),
                plot_dir=layout.stage_plots("evaluate"),
                roc_dir=layout.roc_plots,
                params=params,
                head_pick=layout.head_pick,
                cv_work_dir=layout.checkpoints / "evaluate-cv",
            )
        run.log_metrics(scored.results)
        run.log_artifact(layout.metrics("eval"))
        for path in scored.plots:
            run.log_artifact(path, "plots")
        if params.registry.enabled:
            # Refused before anything is logged to the registry: a NaN model never becomes a version.
            rows = scored.results[params.registry.model]["target_val"]["n"]
            reason = refusal(params.registry.model, scored.non_finite or {}, rows)
            if reason is not None:
                log_refusal(params.registry.model, reason)
                get_run_logger().error("evaluate: %s", reason)
                raise ModelRefused(reason)
        promotion = register_and_promote(layout, params, scored.results, scored.features) if params.registry.enabled else None
        publish_report(scored.results, promotion, run, scored.head_selection)
    return {m: {s: r["accuracy"] for s, r in v.items()} for m, v in model_results(scored.results).items()}
