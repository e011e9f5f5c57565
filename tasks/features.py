"""features stage: frozen-backbone features for every manifest row, cached."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer import features as feats
from xfer.backbones import create_backbone
from xfer.config import Params
from xfer.data.split import read_manifest
from xfer.layout import Layout


@task(name="features", cache_policy=NO_CACHE)
def features(layout: Layout, params: Params) -> dict:
    logger = get_run_logger()
    cfg = params.features
    with stage_run("features", layout, params, ["backbone", "features"]) as run:
        with run.work():
            manifest = read_manifest(layout.manifest)
            # The key needs the weights digest, so the backbone is built even on a hit;
            # the forward pass over the images is what a hit skips.
            model, prep, weights = create_backbone(params.backbone, num_classes=0)
            key = feats.cache_key(params.backbone.name, weights.digest, prep, manifest, dtype=cfg.dtype)
            meta = {"backbone": params.backbone.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict()}

            def compute():
                return feats.extract(model, manifest, prep, cfg.batch_size, root=layout.root, num_workers=cfg.num_workers)

            # Another process (a parallel `dvc exp run`, a second pipeline) may want the same
            # key: get_or_compute lets one of them compute it and the others find it done.
            entry, hit = feats.get_or_compute(layout.features, key, compute, manifest, meta, dtype=cfg.dtype)
            logger.info("features cache %s: %s", "hit" if hit else "miss, computed", entry)
            feats.set_current(layout.features, key)
        run.set_tags({"features_key": key, "weights_digest": weights.digest})
        run.log_metrics({"cache_hit": int(hit), "rows": len(manifest), "dim": model.num_features})
    return {"key": key, "cache_hit": hit}
