"""Classifier heads and their training on cached features."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from xfer.config import HeadConfig
from xfer.io import save_torch, write_json

EpochCallback = Callable[[int, dict[str, float]], None]


def build_head(cfg: HeadConfig, in_dim: int, num_classes: int) -> nn.Module:
    if cfg.kind == "linear":
        return nn.Linear(in_dim, num_classes)
    return nn.Sequential(
        nn.Linear(in_dim, cfg.hidden_dim),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden_dim, num_classes),
    )


@torch.no_grad()
def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train_head(
    cfg: HeadConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    seed: int,
    monitor: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train on `train`, keep the epoch with the best `val` accuracy.

    `monitor` sets (e.g. target val) are only reported each epoch, never
    used to choose anything.
    """
    torch.manual_seed(seed)
    x, y = (torch.as_tensor(a) for a in train)
    vx, vy = (torch.as_tensor(a) for a in val)
    monitored = {k: tuple(torch.as_tensor(a) for a in v) for k, v in (monitor or {}).items()}
    head = build_head(cfg, x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_state, history = -1.0, None, []
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        record = {"train_loss": total / seen, "val_accuracy": accuracy_of(head, vx, vy)}
        for name, (mx, my) in monitored.items():
            record[f"{name}_accuracy"] = accuracy_of(head, mx, my)
        history.append(record)
        if on_epoch:
            on_epoch(epoch, record)
        if record["val_accuracy"] > best_acc:
            best_acc, best_state = record["val_accuracy"], copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return head.eval(), history


HEAD_WEIGHTS_FILE = "head.pt"
HEAD_SPEC_FILE = "head.json"


def save_head(out_dir, head: nn.Module, cfg: HeadConfig, in_dim: int, class_names: list[str], features_key: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    save_torch(out_dir / HEAD_WEIGHTS_FILE, state)
    spec = {"head": cfg.model_dump(), "in_dim": in_dim, "num_classes": len(class_names), "class_names": class_names, "features_key": features_key}
    write_json(out_dir / HEAD_SPEC_FILE, spec)


def load_head(model_dir) -> tuple[nn.Module, dict]:
    model_dir = Path(model_dir)
    for f in (HEAD_WEIGHTS_FILE, HEAD_SPEC_FILE):
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"{model_dir / f} not found (run the head stage)")
    spec = json.loads((model_dir / HEAD_SPEC_FILE).read_text())
    head = build_head(HeadConfig(**spec["head"]), spec["in_dim"], spec["num_classes"])
    head.load_state_dict(torch.load(model_dir / HEAD_WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return head.eval(), spec
