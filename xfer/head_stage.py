"""The head stage's work: a classifier head on cached features, adapted to the target if asked.

`train_heads` trains the main head (and one per fusion backbone), writes
models/head/, the t-SNE and learning-curve figures and metrics/head.json,
and returns the summary; tracking stays in tasks/head.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xfer import features as feats
from xfer.config import HeadConfig, Params, member_name
from xfer.data.split import class_names, read_manifest
from xfer.diagnostics import proxy_a_distance, tsne_coordinates
from xfer.head_search import CandidateCallback, search_heads
from xfer.heads import FEATURE_FUSION, MEMBERS_DIR, VALIDATOR_PREFIX, EpochCallback, HeadData, HeadNet, best_epoch, embed, predict_logits, save_head, train_head
from xfer.importance import importance_weights
from xfer.io import write_json
from xfer.plots import importance_weights_figure, save_figure, save_learning_curves, tsne_figure


@dataclass(frozen=True)
class HeadResult:
    summary: dict  # metrics/head.json
    tsne: Path
    curves: Path
    importance: Path | None  # plots/head/importance_weights.png with head.importance_weighting
    history: list[dict[str, float]]  # the kept head's epochs


def head_data(fs: feats.FeatureSet) -> HeadData:
    """Labelled source train/val; every target train row without its label, plus the labelled
    target budget (if any) with its labels; target val for reports (or the oracle rule)."""
    unlabeled, _ = fs.select("target", "unlabeled")
    labeled = fs.select("target", "train")
    target_train = np.concatenate([unlabeled, labeled[0]]) if len(labeled[1]) else unlabeled
    return HeadData(
        fs.select("source", "train"),
        fs.select("source", "val"),
        target_train,
        fs.select("target", "val"),
        target_labeled=labeled if len(labeled[1]) else None,
    )


def domain_gap(fs: feats.FeatureSet, model: HeadNet, seed: int) -> dict:
    """Proxy A-distance and t-SNE coordinates, before (backbone features) and after adaptation.

    "After" is the layer adaptation changed: the hidden layer of an MLP head
    (or the per-domain standardised features), else, for a plain linear head
    whose input features never move, its logits.
    """
    (xs, ys), (xt, yt) = fs.select("source", "train"), fs.select("target", "unlabeled")
    if isinstance(model.hidden, torch.nn.Identity) and not model.domain_norm:
        after = ("head logits", predict_logits(model, xs, "source"), predict_logits(model, xt, "target"))
    else:
        after = ("head representation", embed(model, xs, "source"), embed(model, xt, "target"))
    spaces = {"backbone features": (xs, xt), after[0]: after[1:]}
    distances, panels = {}, {}
    for name, (s, t) in spaces.items():
        distances[name] = proxy_a_distance(s, t, seed)
        coords, domain, rows = tsne_coordinates(s, t, seed)
        # Target labels only colour the picture; nothing is trained on them.
        labels = np.empty(len(rows), dtype=np.int64)
        labels[domain == 0], labels[domain == 1] = ys[rows[domain == 0]], yt[rows[domain == 1]]
        panels[f"{name} (proxy A-distance {distances[name]:.2f})"] = (coords, domain, labels)
    return {"before": distances["backbone features"], "after": distances[after[0]], "after_space": after[0], "panels": panels}


def train_member_heads(member_features_dir: Path, head_dir: Path, params: Params, cfg: HeadConfig, names: list[str]) -> dict[str, dict]:
    """A head like the main one (`cfg`: its kept method) on each fusion backbone's features, in <head_dir>/members/<name>/."""
    members_dir = head_dir / MEMBERS_DIR
    wanted = [member_name(b) for b in params.fusion.probability_members]
    # A member dropped from params must not linger beside the ones evaluate will read.
    for stale in members_dir.iterdir() if members_dir.is_dir() else []:
        if stale.name not in wanted:
            shutil.rmtree(stale)
    summaries = {}
    for name in wanted:
        fs = feats.load_member(member_features_dir, name)
        model, history = train_head(cfg, head_data(fs), len(names), params.seed)
        save_head(members_dir / name, model, cfg, fs.features.shape[1], names, fs.meta["key"])
        kept = best_epoch(cfg, history)
        summaries[name] = {k: history[kept - 1][k] for k in ("source_val_accuracy", "target_val_accuracy")} | {"best_epoch": kept}
    return summaries


def train_feature_fusion_head(
    main: feats.FeatureSet, member_features_dir: Path, head_dir: Path, params: Params, cfg: HeadConfig, names: list[str]
) -> dict | None:
    """fusion.mode features: a head like the main one (`cfg`: its kept method) on the main backbone's
    features and every fusion member's side by side, in <head_dir>/feature_fusion/; else none (and none left)."""
    out = head_dir / FEATURE_FUSION
    if params.fusion.mode != "features":
        shutil.rmtree(out, ignore_errors=True)
        return None
    fs = feats.load_fused(main, member_features_dir, [member_name(b) for b in params.fusion.backbones])
    model, history = train_head(cfg, head_data(fs), len(names), params.seed)
    save_head(out, model, cfg, fs.features.shape[1], names, fs.meta["key"])
    kept = best_epoch(cfg, history)
    return {k: history[kept - 1][k] for k in ("source_val_accuracy", "target_val_accuracy")} | {"best_epoch": kept, "dim": int(fs.features.shape[1])}


# The knob of each method that head.method auto searches, and finetune.method auto takes with it.
PICK_KNOBS = {"self_training": "pseudo_threshold", "mcc": "mcc_temperature"}


def pick_record(cfg: HeadConfig, finetune_method: str) -> dict:
    """models/head_pick.json: with finetune.method auto, the kept method and its knob; else nothing.

    Finetune's dvc.yaml deps list this file, so it holds only what finetune
    reads: finetune reruns when the pick it takes changes, never because
    head.method changed under a finetune that does not take it.
    """
    if finetune_method != "auto":
        return {}
    knob = PICK_KNOBS.get(cfg.method, "adapt_weight" if cfg.method != "source_only" else None)
    return {"method": cfg.method} | ({knob: getattr(cfg, knob)} if knob else {})


def validators_at(record: dict) -> dict[str, float]:
    """The label-free validators' scores in one epoch record, by validator name."""
    return {k[len(VALIDATOR_PREFIX) :]: v for k, v in record.items() if k.startswith(VALIDATOR_PREFIX)} | {"source_val": record["source_val_accuracy"]}


def train_heads(
    *,
    features_dir: Path,
    member_features_dir: Path,
    manifest_path: Path,
    head_dir: Path,
    pick_path: Path,
    plot_dir: Path,
    metrics_path: Path,
    params: Params,
    on_epoch: EpochCallback | None = None,
    on_candidate: CandidateCallback | None = None,
) -> HeadResult:
    """`features_dir`: the main backbone's published features; `member_features_dir`: the fusion members'.

    With head.method auto the candidates are searched (xfer/head_search.py) and
    the kept one is saved; `on_candidate` hears of each candidate as it is
    trained and `on_epoch` is not called (the kept history is in the result). The kept method goes to `pick_path`.
    """
    cfg = params.head
    fs = feats.load_current(features_dir)
    names = class_names(read_manifest(manifest_path))
    data = head_data(fs)
    search = None
    if cfg.method == "auto":
        found = search_heads(cfg, data, len(names), params.seed, on_candidate)
        model, history, kept_cfg, search = found.model, found.history, found.candidate.config, found.summary
    else:
        model, history = train_head(cfg, data, len(names), params.seed, on_epoch)
        kept_cfg = cfg
    chosen = {"method": kept_cfg.method, "method_requested": cfg.method, "selection": cfg.selection, "uses_target_labels": cfg.uses_target_labels}
    if search is not None:
        chosen["search"] = {k: v for k, v in search.items() if k != "candidates"}
    save_head(head_dir, model, kept_cfg, fs.features.shape[1], names, fs.meta["key"], selection=chosen)
    write_json(pick_path, pick_record(kept_cfg, params.finetune.method))
    kept = best_epoch(kept_cfg, history)
    gap = domain_gap(fs, model, params.seed)
    tsne = save_figure(plot_dir / "tsne.png", tsne_figure(gap["panels"], names, f"source (o) vs target (x), head method {kept_cfg.method}"))
    _, curves = save_learning_curves(plot_dir, history, first_epoch=1, title=f"head ({cfg.kind}, {kept_cfg.method}); epoch kept: {kept} by {cfg.selection}")
    summary = {
        **{k: v for k, v in chosen.items() if k != "search"},
        "target_labels_trained_on": 0 if data.target_labeled is None else len(data.target_labeled[1]),
        "best_epoch": kept,
        "epochs_run": len(history),
        "source_val_accuracy": history[kept - 1]["source_val_accuracy"],
        "target_val_accuracy": history[kept - 1]["target_val_accuracy"],
        "validators": validators_at(history[kept - 1]),
        "proxy_a_distance": {"backbone": gap["before"], "head": gap["after"]},
        "proxy_a_distance_head_space": gap["after_space"],
    }
    importance = None
    if cfg.importance_weighting:
        weights = importance_weights(data.source_train[0], data.target_train, cfg.importance_max_weight, params.seed)  # the search's, cached
        summary["importance_weights"] = weights.summary()
        figure = importance_weights_figure(weights.weights, data.source_train[1], names, summary["importance_weights"])
        importance = save_figure(plot_dir / "importance_weights.png", figure)
    if search is not None:
        summary["search"] = search
    members = train_member_heads(member_features_dir, head_dir, params, kept_cfg, names)
    if members:
        summary["fusion_members"] = members
    fused = train_feature_fusion_head(fs, member_features_dir, head_dir, params, kept_cfg, names)
    if fused is not None:
        summary[FEATURE_FUSION] = fused
    write_json(metrics_path, summary)
    return HeadResult(summary, tsne, curves, importance, history)
