"""Rank candidate backbones before any training: transferability scores on their cached features.

For each candidate backbone, its features of every manifest row come from
the feature cache, computed there when missing exactly as the features
stage computes them (same key, same bytes: one intra-op thread, whole
batches), so the backbone the user then picks is a cache hit for the
features stage. The scores (`xfer.transferability`) read the labelled
source train rows and the unlabelled target rows; no target label is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xfer import features as feats
from xfer.backbones import check_model_name, create_backbone, resolve_weights
from xfer.config import BackboneConfig, FeaturesConfig, Params
from xfer.data.split import read_manifest
from xfer.io import write_json
from xfer.plots import rank_figure, save_figure
from xfer.transferability import SCORE_NAMES, Features, rank_table, recommend

# Which rows each side of the scores reads (role, split); never a target label.
SOURCE_ROWS = ("source", "train")
TARGET_ROWS = ("target", "unlabeled")


def candidate_name(backbone: BackboneConfig) -> str:
    """How a candidate is named in the table: model, size, and where its weights come from."""
    if backbone.weights is not None:
        weights = f"weights {Path(backbone.weights).name}"
    else:
        weights = "pretrained" if backbone.pretrained else "random init"
    return f"{backbone.name} {backbone.image_size}px {weights}"


def offline_candidates(image_size: int) -> list[BackboneConfig]:
    """The default candidates: every backbone whose pretrained weights ship with xfer, and the
    first of them with random weights as a control: where pretraining matters, it scores lowest."""
    from xfer.backbones import offline_pretrained_names

    names = offline_pretrained_names()
    pretrained = [BackboneConfig(name=n, pretrained=True, image_size=image_size) for n in names]
    return [*pretrained, BackboneConfig(name=names[0], pretrained=False, image_size=image_size)]


def cached_features(
    manifest, images_root: Path, cache_root: Path, backbone: BackboneConfig, cfg: FeaturesConfig, progress: bool = True
) -> tuple[feats.FeatureSet, bool]:
    """`backbone`'s features of every `manifest` row from the cache, computed there if missing; (set, hit)."""
    model, prep, weights = create_backbone(backbone, num_classes=0)
    runs_on = feats.compute_for(cfg.device, cfg.half)
    key = feats.cache_key(backbone.name, weights.digest, prep, manifest, dtype=cfg.dtype, compute=runs_on)

    def compute():
        # One intra-op thread and whole batches: the bytes the features stage's shards write.
        with feats.one_intra_op_thread():
            return feats.extract(model, manifest, prep, cfg.batch_size, root=images_root, device=runs_on.device, progress=progress, half=runs_on.half)

    with feats.cache_in_use(cache_root):
        entry, hit = feats.get_or_compute(cache_root, key, compute, manifest, feats.entry_meta(backbone.name, weights.digest, prep, runs_on), dtype=cfg.dtype)
        return feats.load_entry(entry), hit


def score_inputs(fs: feats.FeatureSet) -> Features:
    """What the scores read of one backbone's features: labelled source train, unlabelled target."""
    xs, ys = fs.select(*SOURCE_ROWS)
    xt, _ = fs.select(*TARGET_ROWS)  # the labels are dropped here, unread
    return Features(xs, ys, xt)


@dataclass(frozen=True)
class Ranking:
    rows: list[dict]  # one per candidate: "candidate", every score, "cache_hit"
    recommended: str
    rule: str

    def as_dict(self, seed: int) -> dict:
        return {"backbones": self.rows, "recommended": self.recommended, "rule": self.rule, "scores": list(SCORE_NAMES), "seed": seed}


def rank_backbones(
    manifest_path: Path, images_root: Path, cache_root: Path, candidates: list[BackboneConfig], cfg: FeaturesConfig, seed: int, progress: bool = True
) -> Ranking:
    """Every candidate's transferability scores (one row each, in order), and the recommended one."""
    if not candidates:
        raise ValueError("rank: no candidate backbones (rank.backbones is empty)")
    names = [candidate_name(b) for b in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"rank: candidates repeat: {sorted({n for n in names if names.count(n) > 1})}")
    manifest = read_manifest(manifest_path)
    sets, hits = {}, {}
    for name, backbone in zip(names, candidates):
        fs, hits[name] = cached_features(manifest, images_root, cache_root, backbone, cfg, progress)
        sets[name] = score_inputs(fs)
    rows = [row | {"cache_hit": hits[row["candidate"]]} for row in rank_table(sets, seed)]
    best, rule = recommend(rows)
    return Ranking(rows, best, rule)


def candidates_of(params: Params) -> list[BackboneConfig]:
    """rank.backbones, or (empty) the offline candidates at backbone.image_size."""
    return params.rank.backbones or offline_candidates(params.backbone.image_size)


def check_params(params: Params, root: Path) -> None:
    """Every candidate is a timm model with weights to load, and features.device is here."""
    for backbone in candidates_of(params):
        check_model_name(backbone.name)
        resolve_weights(backbone)
    feats.compute_for(params.features.device, params.features.half)


def rank_stage(
    *,
    manifest_path: Path,
    images_root: Path,
    cache_root: Path,
    metrics_path: Path,
    plot_dir: Path,
    params: Params,
    seed: int | None = None,
    progress: bool = True,
) -> tuple[Ranking, Path]:
    """The rank stage's (and `xfer rank`'s) work: score `params`' candidates, write metrics_path and plot_dir/rank.png."""
    seed = params.seed if seed is None else seed
    ranking = rank_backbones(manifest_path, images_root, cache_root, candidates_of(params), params.features, seed, progress)
    write_json(metrics_path, ranking.as_dict(seed))
    plot = save_figure(Path(plot_dir) / "rank.png", rank_figure(ranking.rows, list(SCORE_NAMES), ranking.recommended))
    return ranking, plot
