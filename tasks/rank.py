"""rank stage (optional, on when rank.backbones is set): score candidate backbones (xfer/rank.py), then track them."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.layout import Layout
from xfer.rank import rank_stage
from xfer.transferability import SCORE_NAMES


@task(name="rank", cache_policy=NO_CACHE)
def rank(layout: Layout, params: Params) -> dict:
    logger = get_run_logger()
    with stage_run("rank", layout, params) as run:
        with run.work():
            ranking, plot = rank_stage(
                manifest_path=layout.manifest,
                images_root=layout.root,
                cache_root=layout.feature_cache,
                metrics_path=layout.metrics("rank"),
                plot_dir=layout.stage_plots("rank"),
                params=params,
            )
        for row in ranking.rows:
            # One metric per (candidate, score); a candidate's name has spaces, MLflow keys may not want them.
            run.log_metrics({score: row[score] for score in SCORE_NAMES}, prefix=f"{row['candidate'].replace(' ', '_')}.")
        run.set_tags({"rank.recommended": ranking.recommended})
        run.log_artifact(layout.metrics("rank"))
        run.log_artifact(plot, "plots")
        logger.info("rank: recommended %s. %s", ranking.recommended, ranking.rule)
    return {"recommended": ranking.recommended}
