"""translate stage (optional, on when translate.enabled): the image translator (xfer/translate_stage.py), then track it."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.layout import Layout
from xfer.translate_stage import stage_paths, translate_stage


@task(name="translate", cache_policy=NO_CACHE)
def translate(layout: Layout, params: Params) -> dict:
    logger = get_run_logger()
    with stage_run("translate", layout, params) as run:
        with run.work():
            result = translate_stage(**stage_paths(layout), params=params, on_epoch=run.epoch_logger("translate"))
        run.log_metrics(result.summary, prefix="translate.")
        run.log_metrics({"time.translate_s": result.seconds})
        run.set_tags({"translate.key": result.key})
        run.log_artifact(layout.metrics("translate"))
        run.log_artifact(result.grid, "plots")
        run.log_artifact(result.curves, "plots")
        how = "from the cache" if result.cache_hit else f"trained ({result.summary['epochs_reused']} epochs resumed)"
        logger.info("translate: %d source train images translated, %s, in %.1f s", result.summary["source_images"], how, result.seconds)
    return result.summary
