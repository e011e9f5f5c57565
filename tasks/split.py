"""split stage: the fetched catalog -> data/splits/manifest.csv and its report."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.data.sources import resolve_source
from xfer.data.split import build_manifest, labels_path
from xfer.io import save_with, write_json
from xfer.layout import Layout


@task(name="split", cache_policy=NO_CACHE)
def split(layout: Layout, params: Params) -> dict:
    with stage_run("split", layout, params) as run:
        with run.work():
            dataset_dir = layout.raw / resolve_source(params.data).name
            manifest, report = build_manifest(dataset_dir, params.data, params.seed, root=layout.root)
            save_with(layout.manifest, lambda tmp: manifest.to_csv(tmp, index=False))
            write_json(layout.split_report, report)
        run.log_metrics({k.replace("/", "."): n for k, n in report["rows"].items()}, prefix="rows.")
        run.log_metrics({"duplicates_removed": report["duplicates_removed"]["dropped"]})
        run.log_artifact(layout.manifest)
        run.log_artifact(layout.split_report)
        if params.data.split.target_labels is not None:  # the labelled target rows a person gave
            run.log_artifact(labels_path(params.data.split.target_labels, layout.root))
    return report["rows"]
