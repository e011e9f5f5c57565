"""features stage: frozen-backbone features for every manifest row, cached.

Entries live in the content-addressed cache `data/feature-cache/<key>/`, which
is not a DVC output. The stage's outputs are what later stages read: the main
backbone's entry published as `data/features/current/` (head, finetune and
evaluate), and each of `fusion.backbones` as `data/features/members/<name>/`
with `members.json` (head and evaluate). So adding a fusion backbone never
reruns finetune, and dvc.lock never hashes entries of earlier runs.

A missing entry is computed in shards of `features.shard_rows` rows, mapped
over the task runner `features.runner` names (threads, Dask or Ray: see
tasks/runners.py). Each shard is written to `<key>.shards/` on its own, so a
failed shard is retried alone and a rerun after a crash computes only the
missing ones; the merged entry is then written atomically. Shards hold whole
batches, so the entry is byte for byte what one pass would give.
"""

from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from torch import nn
from tqdm.auto import tqdm

from tasks.runners import shard_runner
from tasks.tracking import stage_run
from xfer import features as feats
from xfer.backbones import create_backbone
from xfer.config import BackboneConfig, FeaturesConfig, Params, member_name
from xfer.data.images import Preprocessing
from xfer.data.split import read_manifest
from xfer.layout import Layout

_BUILD = threading.Lock()


def _shard_backbone(config_json: str, digest: str) -> tuple[nn.Module, Preprocessing]:
    """The frozen backbone for shards, built once per process and shared by its shards and threads."""
    with _BUILD:
        return _build_shard_backbone(config_json, digest)


@functools.lru_cache(maxsize=2)
def _build_shard_backbone(config_json: str, digest: str) -> tuple[nn.Module, Preprocessing]:
    model, prep, weights = create_backbone(BackboneConfig.model_validate_json(config_json), num_classes=0)
    # A cluster worker reads the weights from its own disk: features from other
    # weights than the key names would poison the cache.
    if weights.digest != digest:
        raise feats.FeatureCacheError(
            f"this worker's weights for {model.__class__.__name__} ({weights.path or 'random init'}) have digest {weights.digest[:12]}, "
            f"but the cache key was made with {digest[:12]}: every worker needs the same weights files"
        )
    return model.eval(), prep


@task(name="feature-shard", cache_policy=NO_CACHE)
def feature_shard(
    root: str, backbone: BackboneConfig, digest: str, rows: pd.DataFrame, batch_size: int, num_workers: int, out: str, compute: feats.Compute = feats.CPU
) -> str:
    """Features of `rows` into the shard file `out`; a shard already there is kept."""
    path = Path(out)
    if feats.read_shard(path, len(rows)) is not None:
        return out
    model, prep = _shard_backbone(backbone.model_dump_json(), digest)
    # Cluster workers keep one intra-op thread for good; on the threads runner
    # extract_shards already holds this process at one (xfer.features.one_intra_op_thread).
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    features = feats.extract(model, rows, prep, batch_size, root=Path(root), device=compute.device, progress=False, num_workers=num_workers, half=compute.half)
    feats.write_shard(path, features, len(rows))
    return out


@flow(name="feature-shards")
def extract_shards(
    root: str, backbone: BackboneConfig, digest: str, manifest: pd.DataFrame, cfg: FeaturesConfig, shards: str, compute: feats.Compute = feats.CPU
) -> int:
    """Map the missing shards of `manifest` over the flow's task runner; return how many were computed."""
    bounds = feats.shard_bounds(len(manifest), cfg.shard_rows, cfg.batch_size)
    todo = [(a, b) for a, b in bounds if feats.read_shard(feats.shard_path(Path(shards), a, b), b - a) is None]
    get_run_logger().info(
        "%s: %d shards of %d rows, %d to compute on %s (%s)", backbone.name, len(bounds), cfg.shard_rows, len(todo), cfg.runner.kind, compute.tag
    )
    # DataLoader processes inside Dask or Ray workers would compete with the workers themselves.
    num_workers = cfg.num_workers if cfg.runner.kind == "threads" else 0
    shard_task = feature_shard.with_options(retries=cfg.runner.retries, retry_delay_seconds=1)
    with feats.one_intra_op_thread(), tqdm(total=len(bounds), initial=len(bounds) - len(todo), desc=f"features {backbone.name}", unit="shard") as bar:
        futures = [
            shard_task.submit(root, backbone, digest, manifest.iloc[a:b], cfg.batch_size, num_workers, str(feats.shard_path(Path(shards), a, b)), compute)
            for a, b in todo
        ]
        for future in as_completed(futures):
            future.result()  # a shard that failed all its retries stops the stage here
            bar.update(1)
    return len(todo)


def cached_features(layout: Layout, backbone: BackboneConfig, cfg: FeaturesConfig, manifest: pd.DataFrame) -> dict:
    """The cache entry of `backbone` over `manifest`, computed unless already there."""
    # The key needs the weights digest, so the backbone is built even on a hit;
    # the forward pass over the images is what a hit skips.
    model, prep, weights = create_backbone(backbone, num_classes=0)
    digest = weights.digest
    runs_on = feats.compute_for(cfg.device, cfg.half)
    key = feats.cache_key(backbone.name, digest, prep, manifest, dtype=cfg.dtype, compute=runs_on)
    meta = feats.entry_meta(backbone.name, digest, prep, runs_on)
    shards = feats.shards_dir(layout.feature_cache, key)

    how = "miss, computed"

    def compute():
        nonlocal how
        # A clone that got the outputs from `dvc pull` has them but not the cache: take
        # them from there (they pass their digests) rather than run the backbone again.
        published = feats.find_published(key, [layout.features_current, *feats.member_dirs(layout.features_members)])
        if published is not None:
            how = f"miss, taken from {published}"
            return np.load(published / feats.FEATURES_FILE)
        with shard_runner(cfg.runner) as runner:
            extract_shards.with_options(task_runner=runner)(str(layout.root.resolve()), backbone, digest, manifest, cfg, str(shards), runs_on)
        return feats.merge_shards(shards, feats.shard_bounds(len(manifest), cfg.shard_rows, cfg.batch_size))

    # Another process (a parallel `dvc exp run`, a second pipeline) may want the same
    # key: get_or_compute lets one of them compute it and the others find it done.
    entry, hit = feats.get_or_compute(layout.feature_cache, key, compute, manifest, meta, dtype=cfg.dtype)
    # The entry is whole now; its shards were only the way there.
    shutil.rmtree(shards, ignore_errors=True)
    get_run_logger().info("features of %s: cache %s: %s", backbone.name, "hit" if hit else how, entry)
    return {"key": key, "cache_hit": hit, "dim": model.num_features, "weights_digest": digest, "entry": entry}


def _mention_old_layout(layout: Layout) -> None:
    """Entries an older xfer cached in data/features/ itself: nothing reads them now."""
    ours = {layout.features_current.name, layout.features_members.name}
    old = [p for p in layout.features.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if old:
        get_run_logger().warning(
            "features: %s holds %d files or folders of the old cache layout that nothing reads now; `xfer cache gc` removes them",
            layout.features,
            len(old),
        )


@task(name="features", cache_policy=NO_CACHE)
def features(layout: Layout, params: Params) -> dict:
    with stage_run("features", layout, params) as run:
        with run.work():
            manifest = read_manifest(layout.manifest)
            # Shared with other stages, exclusive to `xfer cache gc`: no entry this run
            # finds or computes is removed before it is published.
            with feats.cache_in_use(layout.feature_cache):
                main = cached_features(layout, params.backbone, params.features, manifest)
                members = {member_name(b): cached_features(layout, b, params.features, manifest) for b in params.fusion.backbones}
                linked = feats.publish_current(main["entry"], layout.features_current)
                linked &= feats.publish_members({name: m["entry"] for name, m in members.items()}, layout.features_members)
            get_run_logger().info(
                "features: published %s and %s (%s the cache)",
                layout.features_current,
                layout.features_members,
                "hard links into" if linked else "copies from",
            )
            _mention_old_layout(layout)
        run.set_tags({"features_key": main["key"], "weights_digest": main["weights_digest"]})
        run.log_metrics({"cache_hit": int(main["cache_hit"]), "rows": len(manifest), "dim": main["dim"]})
        for name, m in members.items():
            run.log_metrics({f"{name}.cache_hit": int(m["cache_hit"]), f"{name}.dim": m["dim"]})
    return {"key": main["key"], "cache_hit": main["cache_hit"], **({"members": {n: m["key"] for n, m in members.items()}} if members else {})}
