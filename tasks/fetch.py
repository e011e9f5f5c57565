"""fetch stage: materialise the dataset as one ImageFolder per domain, validated."""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.data.download import DownloadError
from xfer.data.fetch import REPORT, SUMMARY, fetch_dataset
from xfer.data.sources import resolve_source
from xfer.io import sha256_file, sha256_json
from xfer.layout import Layout

DOWNLOAD_QUERY_ENV = "XFER_DOWNLOAD_QUERY"


def raw_digest(layout: Layout, dataset: str) -> str:
    """Digest of every file's relative path and content under data/raw/<dataset>."""
    root = layout.raw / dataset
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return sha256_json([(p.relative_to(root).as_posix(), sha256_file(p)) for p in files])


def network_failed(task, task_run, state) -> bool:
    """Retry a dropped or refused download (it resumes from its .part file); never a bad checksum or layout."""
    return isinstance(state.data, DownloadError)


@task(name="fetch", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=network_failed)
def fetch(layout: Layout, params: Params) -> dict:
    name = resolve_source(params.data).name
    with stage_run("fetch", layout, params) as run:
        with run.work():
            # Secret query parameters for data.dataset's URL come from the environment, never params.yaml (xfer/redact.py).
            query = os.environ.get(DOWNLOAD_QUERY_ENV) or None
            summary = fetch_dataset(params.data, layout.raw, layout.downloads, root=layout.root, download_query=query)
        run.set_tags({"data_digest": raw_digest(layout, name), "dataset": name})
        run.log_metrics({d: v["images"] for d, v in summary["domains"].items()}, prefix="images.")
        run.log_metrics({d: v["corrupt"] for d, v in summary["domains"].items()}, prefix="corrupt.")
        run.log_metrics({d: v["special_files"] for d, v in summary["domains"].items()}, prefix="special_files.")
        run.log_artifact(layout.raw / name / SUMMARY)
        run.log_artifact(layout.raw / name / REPORT)
    return {"images": {d: v["images"] for d, v in summary["domains"].items()}}
