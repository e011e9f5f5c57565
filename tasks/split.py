"""split stage: ImageFolder domains -> data/splits/manifest.csv."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.config import Params
from xfer.data.split import build_manifest
from xfer.io import save_with
from xfer.layout import Layout


@task(name="split", cache_policy=NO_CACHE)
def split(layout: Layout, params: Params) -> dict:
    with stage_run("split", layout, params, ["seed", "data"]) as run:
        with run.work():
            manifest = build_manifest(
                layout.raw / params.data.dataset,
                params.data.source_domain,
                params.data.target_domain,
                params.data.split,
                params.seed,
                root=layout.root,
            )
            save_with(layout.manifest, lambda tmp: manifest.to_csv(tmp, index=False))
        counts = manifest.groupby(["role", "split"]).size()
        run.log_metrics({f"{role}.{split}": int(n) for (role, split), n in counts.items()}, prefix="rows.")
        run.log_artifact(layout.manifest)
    return {f"{role}/{split}": int(n) for (role, split), n in counts.items()}
