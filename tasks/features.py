"""features stage: frozen-backbone features for every manifest row, cached.

The main backbone's entry becomes `current`; each of `fusion.backbones` gets an
entry of its own, named in `members.json`, for the head stage to train on.
"""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer import features as feats
from xfer.backbones import create_backbone
from xfer.config import BackboneConfig, FeaturesConfig, Params, member_name
from xfer.data.split import read_manifest
from xfer.layout import Layout


def cached_features(layout: Layout, backbone: BackboneConfig, cfg: FeaturesConfig, manifest: pd.DataFrame) -> dict:
    """The cache entry of `backbone` over `manifest`, computed unless already there."""
    # The key needs the weights digest, so the backbone is built even on a hit;
    # the forward pass over the images is what a hit skips.
    model, prep, weights = create_backbone(backbone, num_classes=0)
    key = feats.cache_key(backbone.name, weights.digest, prep, manifest, dtype=cfg.dtype)
    meta = {"backbone": backbone.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict()}

    def compute():
        return feats.extract(model, manifest, prep, cfg.batch_size, root=layout.root, num_workers=cfg.num_workers)

    # Another process (a parallel `dvc exp run`, a second pipeline) may want the same
    # key: get_or_compute lets one of them compute it and the others find it done.
    entry, hit = feats.get_or_compute(layout.features, key, compute, manifest, meta, dtype=cfg.dtype)
    get_run_logger().info("features of %s: cache %s: %s", backbone.name, "hit" if hit else "miss, computed", entry)
    return {"key": key, "cache_hit": hit, "dim": model.num_features, "weights_digest": weights.digest}


@task(name="features", cache_policy=NO_CACHE)
def features(layout: Layout, params: Params) -> dict:
    with stage_run("features", layout, params, ["backbone", "features", "fusion"]) as run:
        with run.work():
            manifest = read_manifest(layout.manifest)
            main = cached_features(layout, params.backbone, params.features, manifest)
            members = {member_name(b): cached_features(layout, b, params.features, manifest) for b in params.fusion.backbones}
            feats.set_current(layout.features, main["key"])
            feats.set_members(layout.features, {name: m["key"] for name, m in members.items()})
        run.set_tags({"features_key": main["key"], "weights_digest": main["weights_digest"]})
        run.log_metrics({"cache_hit": int(main["cache_hit"]), "rows": len(manifest), "dim": main["dim"]})
        for name, m in members.items():
            run.log_metrics({f"{name}.cache_hit": int(m["cache_hit"]), f"{name}.dim": m["dim"]})
    return {"key": main["key"], "cache_hit": main["cache_hit"], **({"members": {n: m["key"] for n, m in members.items()}} if members else {})}
