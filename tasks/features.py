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
    with stage_run("features", layout, params, ["backbone", "features"]) as run:
        with run.work():
            manifest = read_manifest(layout.manifest)
            model, prep, weights = create_backbone(params.backbone, num_classes=0)
            key = feats.cache_key(params.backbone.name, weights.digest, prep, manifest)
            entry = feats.entry_dir(layout.features, key)
            hit = feats.is_complete(entry)
            if hit:
                logger.info("features cache hit: %s", entry)
            else:
                array = feats.extract(model, manifest, prep, params.features.batch_size, root=layout.root)
                meta = {"backbone": params.backbone.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict()}
                feats.write_entry(layout.features, key, array, manifest, meta)
            feats.set_current(layout.features, key)
        run.set_tags({"features_key": key, "weights_digest": weights.digest})
        run.log_metrics({"cache_hit": int(hit), "rows": len(manifest), "dim": model.num_features})
    return {"key": key, "cache_hit": hit}
