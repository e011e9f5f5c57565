"""fetch stage: materialise the dataset as one ImageFolder per domain."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.data.fetch import fetch_dataset
from xfer.io import sha256_file, sha256_json
from xfer.layout import Layout


def raw_digest(layout: Layout, dataset: str) -> str:
    """Digest of every file's relative path and content under data/raw/<dataset>."""
    root = layout.raw / dataset
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return sha256_json([(p.relative_to(root).as_posix(), sha256_file(p)) for p in files])


@task(name="fetch", cache_policy=NO_CACHE)
def fetch(layout: Layout, params: Params) -> dict:
    with stage_run("fetch", layout, params, ["seed", "data"]) as run:
        with run.work():
            summary = fetch_dataset(params.data, layout.raw, params.seed)
        run.set_tags({"data_digest": raw_digest(layout, params.data.dataset)})
        run.log_metrics({d: v["images"] for d, v in summary["domains"].items()}, prefix="images.")
        run.log_artifact(layout.raw / params.data.dataset / "dataset.json")
    return {"images": {d: v["images"] for d, v in summary["domains"].items()}}
