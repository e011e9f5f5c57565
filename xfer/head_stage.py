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
from xfer.config import Params, member_name
from xfer.data.split import class_names, read_manifest
from xfer.diagnostics import proxy_a_distance, tsne_coordinates
from xfer.heads import MEMBERS_DIR, EpochCallback, HeadData, HeadNet, best_epoch, embed, predict_logits, save_head, train_head
from xfer.io import write_json
from xfer.plots import save_figure, save_learning_curves, tsne_figure


@dataclass(frozen=True)
class HeadResult:
    summary: dict  # metrics/head.json
    tsne: Path
    curves: Path


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


def train_member_heads(member_features_dir: Path, head_dir: Path, params: Params, names: list[str]) -> dict[str, dict]:
    """A head like the main one on each fusion backbone's features, in <head_dir>/members/<name>/."""
    members_dir = head_dir / MEMBERS_DIR
    wanted = [member_name(b) for b in params.fusion.backbones]
    # A member dropped from params must not linger beside the ones evaluate will read.
    for stale in members_dir.iterdir() if members_dir.is_dir() else []:
        if stale.name not in wanted:
            shutil.rmtree(stale)
    summaries = {}
    for name in wanted:
        fs = feats.load_member(member_features_dir, name)
        model, history = train_head(params.head, head_data(fs), len(names), params.seed)
        save_head(members_dir / name, model, params.head, fs.features.shape[1], names, fs.meta["key"])
        kept = best_epoch(params.head, history)
        summaries[name] = {k: history[kept - 1][k] for k in ("source_val_accuracy", "target_val_accuracy")} | {"best_epoch": kept}
    return summaries


def train_heads(
    *,
    features_dir: Path,
    member_features_dir: Path,
    manifest_path: Path,
    head_dir: Path,
    plot_dir: Path,
    metrics_path: Path,
    params: Params,
    on_epoch: EpochCallback | None = None,
) -> HeadResult:
    """`features_dir`: the main backbone's published features; `member_features_dir`: the fusion members'."""
    cfg = params.head
    fs = feats.load_current(features_dir)
    names = class_names(read_manifest(manifest_path))
    data = head_data(fs)
    model, history = train_head(cfg, data, len(names), params.seed, on_epoch)
    save_head(head_dir, model, cfg, fs.features.shape[1], names, fs.meta["key"])
    kept = best_epoch(cfg, history)
    gap = domain_gap(fs, model, params.seed)
    tsne = save_figure(plot_dir / "tsne.png", tsne_figure(gap["panels"], names, f"source (o) vs target (x), head method {cfg.method}"))
    _, curves = save_learning_curves(plot_dir, history, first_epoch=1, title=f"head ({cfg.kind}, {cfg.method}); epoch kept: {kept}")
    summary = {
        "method": cfg.method,
        "selection": cfg.selection,
        "uses_target_labels": cfg.uses_target_labels,
        "target_labels_trained_on": 0 if data.target_labeled is None else len(data.target_labeled[1]),
        "best_epoch": kept,
        "epochs_run": len(history),
        "source_val_accuracy": history[kept - 1]["source_val_accuracy"],
        "target_val_accuracy": history[kept - 1]["target_val_accuracy"],
        "proxy_a_distance": {"backbone": gap["before"], "head": gap["after"]},
        "proxy_a_distance_head_space": gap["after_space"],
    }
    members = train_member_heads(member_features_dir, head_dir, params, names)
    if members:
        summary["fusion_members"] = members
    write_json(metrics_path, summary)
    return HeadResult(summary, tsne, curves)
