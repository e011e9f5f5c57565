"""Fine-tuning the whole network, starting from a trained head (LP-FT).

Linear probe first (the head stage), then every weight moves: starting the
classifier from the probe keeps the random-head gradients from wrecking the
pretrained features in the first steps.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from xfer.backbones import Preprocessing
from xfer.config import FinetuneConfig, HeadConfig
from xfer.heads import build_head
from xfer.io import save_torch, write_json

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"

EpochCallback = Callable[[int, dict[str, float]], None]


class Classifier(nn.Module):
    """backbone (pooled features) -> head (logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a saved Classifier without its training config."""

    backbone: str
    head: dict
    feature_dim: int
    num_classes: int
    class_names: list[str]
    preprocessing: dict

    def prep(self) -> Preprocessing:
        p = self.preprocessing
        return Preprocessing(p["image_size"], tuple(p["mean"]), tuple(p["std"]), p.get("channels", 3))


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(requested)


def _autocast(device: torch.device, amp: bool = True):
    # bf16 keeps fp32's range, so no loss scaling is needed; CPU stays fp32 for exactness.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, progress: bool = False, desc: str = "predict", amp: bool = True) -> tuple[np.ndarray, np.ndarray]:
    model.eval().to(device)
    logits, labels = [], []
    for x, y in tqdm(DataLoader(data, batch_size=batch_size), desc=desc, unit="batch", disable=not progress):
        with _autocast(device, amp):
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def _accuracy(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, amp: bool) -> float:
    logits, labels = predict_logits(model, data, batch_size, device, amp=amp)
    return float((logits.argmax(1) == labels).mean())


def finetune(
    model: Classifier,
    train: Dataset,
    val: Dataset,
    cfg: FinetuneConfig,
    device: torch.device,
    seed: int,
    monitor: dict[str, Dataset] | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
) -> tuple[Classifier, list[dict[str, float]]]:
    """Train every weight on `train`; keep the epoch (0 = the probe) with the best `val` accuracy."""
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": cfg.lr},
            {"params": model.head.parameters(), "lr": cfg.lr * cfg.head_lr_scale},
        ],
        weight_decay=cfg.weight_decay,
    )
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train) > cfg.batch_size, generator=torch.Generator().manual_seed(seed))
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(epoch: int, train_loss: float | None) -> dict[str, float]:
        record = {"val_accuracy": _accuracy(model, val, cfg.batch_size * 2, device, cfg.amp)}
        if train_loss is not None:
            record["train_loss"] = train_loss
        for name, data in (monitor or {}).items():
            record[f"{name}_accuracy"] = _accuracy(model, data, cfg.batch_size * 2, device, cfg.amp)
        if on_epoch:
            on_epoch(epoch, record)
        return record

    history = [evaluate(0, None)]
    best_acc, best_state = history[0]["val_accuracy"], copy.deepcopy(model.state_dict())
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        if cfg.freeze_bn:
            freeze_batchnorm(model)
        total, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"finetune epoch {epoch}/{cfg.epochs}", unit="step", disable=not progress)
        # islice, not a break: a break would load one batch too many.
        for x, y in itertools.islice(loader, steps_per_epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        record = evaluate(epoch, total / max(seen, 1))
        history.append(record)
        if record["val_accuracy"] > best_acc:
            best_acc, best_state = record["val_accuracy"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), history


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm on its running statistics while the rest trains.

    Pretrained BN statistics describe the source images well; batch
    statistics of small, shifted batches do not, and timm's TF-ported models
    update running stats with momentum 0.01, so train-mode and eval-mode
    outputs drift apart for many epochs.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def build_classifier(spec: ClassifierSpec) -> Classifier:
    backbone = timm.create_model(spec.backbone, pretrained=False, num_classes=0)
    head = build_head(HeadConfig(**spec.head), spec.feature_dim, spec.num_classes)
    return Classifier(backbone, head)


def save_classifier(out_dir: Path, model: Classifier, spec: ClassifierSpec) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(out_dir / WEIGHTS_FILE, state)
    write_json(out_dir / SPEC_FILE, asdict(spec))


def load_classifier(model_dir: Path) -> tuple[Classifier, ClassifierSpec]:
    model_dir = Path(model_dir)
    for f in (WEIGHTS_FILE, SPEC_FILE):
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"{model_dir / f} not found (run the finetune stage)")
    spec = ClassifierSpec(**json.loads((model_dir / SPEC_FILE).read_text()))
    model = build_classifier(spec)
    model.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), spec
