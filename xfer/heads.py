"""Classifier heads on cached features, trained with or without domain adaptation.

A head is `HeadNet`: optional standardisation of the features (per domain,
or joint over both), an optional hidden layer (the representation
adaptation aligns; with BatchNorm for kind bottleneck), and a linear
classifier. `train_head` trains it on labelled source features and,
for an adaptation method, unlabelled target features; the epoch kept is
the best by the model-selection rule the config names.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xfer.adapt import build_adaptation_loss
from xfer.config import VALIDATOR_NAMES, HeadConfig
from xfer.importance import importance_weights
from xfer.io import save_torch, write_json
from xfer.samplers import epoch_rows
from xfer.validators import Evidence, Outputs, score

EpochCallback = Callable[[int, dict[str, float]], None]
DOMAINS = ("source", "target")


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN or infinite loss: it stops there rather than save a broken model."""


def check_loss(value: float, where: str, advice: str) -> None:
    """Raise NonFiniteLossError naming `where` (the step and epoch) and the loss, if `value` is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{where}: the loss is {value}, so training stopped before any model was written; {advice}")


Labelled = tuple[np.ndarray, np.ndarray]


class HeadNet(nn.Module):
    """features -> [standardisation] -> [Linear-(BatchNorm)-ReLU-Dropout] -> Linear -> logits."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        kind: str = "linear",
        hidden_dim: int = 256,
        dropout: float = 0.0,
        domain_norm: bool = False,
        feature_norm: str = "none",
    ):
        super().__init__()
        if domain_norm and feature_norm == "joint":
            raise ValueError("domain_norm and feature_norm 'joint' exclude each other")
        self.domain_norm = domain_norm
        self.feature_norm = feature_norm
        # Row 0: source statistics, row 1: target (feature_norm joint: both rows the same).
        # Kept even when unused, so every head saves alike.
        self.register_buffer("feature_mean", torch.zeros(len(DOMAINS), in_dim))
        self.register_buffer("feature_std", torch.ones(len(DOMAINS), in_dim))
        if kind == "mlp":
            self.hidden: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            self.embed_dim = hidden_dim
        elif kind == "bottleneck":
            self.hidden = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            self.embed_dim = hidden_dim
        else:
            self.hidden = nn.Identity()
            self.embed_dim = in_dim
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def fit_domain_norm(self, source: np.ndarray, target: np.ndarray) -> None:
        for i, x in enumerate((source, target)):
            x = torch.as_tensor(np.asarray(x, dtype=np.float32))
            self.feature_mean[i] = x.mean(0)
            # A constant feature keeps std 1 instead of dividing by zero.
            self.feature_std[i] = torch.where(x.std(0) > 1e-6, x.std(0), torch.ones(()))

    def fit_joint_norm(self, source: np.ndarray, target: np.ndarray) -> None:
        """feature_norm joint: the statistics of source and target rows together, in both domain rows."""
        x = torch.as_tensor(np.concatenate([np.asarray(source, dtype=np.float32), np.asarray(target, dtype=np.float32)]))
        std = x.std(0)
        self.feature_mean[:] = x.mean(0)
        self.feature_std[:] = torch.where(std > 1e-6, std, torch.ones(()))

    @property
    def has_batchnorm(self) -> bool:
        """Batch statistics in the hidden layer: training passes both domains through it together."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.hidden.modules())

    def standardise(self, features: torch.Tensor, domain: str = "target") -> torch.Tensor:
        if self.domain_norm or self.feature_norm == "joint":
            i = DOMAINS.index(domain)
            features = (features - self.feature_mean[i]) / self.feature_std[i]
        return features

    def embed(self, features: torch.Tensor, domain: str = "target") -> torch.Tensor:
        return self.hidden(self.standardise(features, domain))

    def embed_together(self, batches: list[tuple[torch.Tensor, str]]) -> list[torch.Tensor]:
        """Embed (features, domain) batches in one pass of the hidden layer (BatchNorm sees them all), split back."""
        joint = self.hidden(torch.cat([self.standardise(x, domain) for x, domain in batches]))
        return list(joint.split([len(x) for x, _ in batches]))

    def forward(self, features: torch.Tensor, domain: str = "target") -> torch.Tensor:
        """Logits; `domain` picks the standardisation when domain_norm is on (new data is target data)."""
        return self.classifier(self.embed(features, domain))


def build_head(cfg: HeadConfig, in_dim: int, num_classes: int) -> HeadNet:
    return HeadNet(in_dim, num_classes, cfg.kind, cfg.hidden_dim, cfg.dropout, cfg.domain_norm, cfg.feature_norm)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of a head: a short last batch is a step too."""
    return -(-rows // batch_size)


def scheduled_lr(cfg: HeadConfig, step: int, total_steps: int) -> float:
    """The learning rate of 1-based step `step` of `total_steps`: constant, or inverse_decay
    lr * (1 + 10 p) ** -0.75 with p = step / total_steps (lr * 11 ** -0.75 at the last step)."""
    if cfg.lr_schedule == "inverse_decay":
        return cfg.lr * (1 + 10 * step / total_steps) ** -0.75
    return cfg.lr


def build_optimizer(cfg: HeadConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class HeadData:
    """The feature sets a head sees.

    target_train comes without labels (for adaptation); target_labeled is the
    optional labelled target budget (semi-supervised), trained like source rows.
    """

    source_train: Labelled
    source_val: Labelled
    target_train: np.ndarray | None = None
    target_val: Labelled | None = None
    target_labeled: Labelled | None = None
    # head.importance_weighting: one weight per source train row (xfer/importance.py); None = computed
    # from source_train and target_train when a head needs them.
    source_weights: np.ndarray | None = None


def with_importance_weights(cfg: HeadConfig, data: HeadData, seed: int) -> HeadData:
    """`data` carrying its source rows' importance weights when `cfg` asks for them (computed once here)."""
    if not cfg.importance_weighting or data.source_weights is not None:
        return data
    if data.target_train is None:
        raise ValueError("head.importance_weighting needs the unlabelled target train features to weigh the source rows against")
    weights = importance_weights(data.source_train[0], data.target_train, cfg.importance_max_weight, seed).weights
    return dataclasses.replace(data, source_weights=weights)


def source_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None, label_smoothing: float, row_weight: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy over a source batch; with row weights, their weighted mean.

    Each row counts row_weight * class_weight[label], and the sum is divided by the
    batch's total of those, as the class-weighted mean divides by its class weights.
    """
    if row_weight is None:
        return F.cross_entropy(logits, labels, weight=class_weight, label_smoothing=label_smoothing)
    per_row = F.cross_entropy(logits, labels, weight=class_weight, label_smoothing=label_smoothing, reduction="none")
    counts = row_weight if class_weight is None else row_weight * class_weight[labels]
    return (per_row * row_weight).sum() / counts.sum()


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


@torch.no_grad()
def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, domain: str = "target") -> float:
    model.eval()
    return float((model(x, domain).argmax(1) == y).float().mean())


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled to mean 1 over the classes present."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    weights *= (counts > 0).sum() / weights.sum()
    return torch.as_tensor(weights, dtype=torch.float32)


def selection_key(selection: str) -> str:
    """The history key a selection rule maximises (`last` keeps the last epoch, whatever it scores)."""
    if selection in ("source_val", "target_val"):
        return f"{selection}_accuracy"
    return f"{VALIDATOR_PREFIX}{selection}"


VALIDATOR_PREFIX = "validator_"
# Scored each epoch as it ends (the panel beside source val accuracy); `ensv` needs
# every epoch, so it is scored after the last one.
EPOCH_VALIDATORS = tuple(n for n in VALIDATOR_NAMES if n not in ("source_val", "ensv"))


def selection_evidence(data: HeadData, num_classes: int, seed: int) -> Evidence:
    """What the validators judge a head's epochs against: backbone features, source val labels."""
    return Evidence(
        source_val_labels=np.asarray(data.source_val[1]),
        source_val_features=np.asarray(data.source_val[0], dtype=np.float32),
        target_features=np.asarray(data.target_train, dtype=np.float32),
        source_train_features=np.asarray(data.source_train[0], dtype=np.float32),
        num_classes=num_classes,
        seed=seed,
    )


@torch.no_grad()
def outputs_of(head: HeadNet, x_source_val: torch.Tensor, x_target: torch.Tensor) -> Outputs:
    head.eval()
    return Outputs(target=F.softmax(head(x_target, "target"), 1).numpy(), source_val=F.softmax(head(x_source_val, "source"), 1).numpy())


def pick_epoch(selection: str, history: list[dict[str, float]]) -> int:
    """1-based epoch kept: the last epoch for `last`, else the last with the best score.

    Ties go to the later epoch: source val saturates early, and the adaptation loss
    only has its say after that, so "first best" would keep a barely adapted head.
    """
    if selection == "last":
        return len(history)
    scores = [r[selection_key(selection)] for r in history]
    return len(scores) - scores[::-1].index(max(scores))


@dataclass
class Epoch:
    """One finished epoch of a head: its record, the live model, and its predictions for the validators."""

    number: int  # 1-based
    record: dict[str, float]
    head: HeadNet
    outputs: Outputs | None  # None without target rows


def head_epochs(cfg: HeadConfig, data: HeadData, num_classes: int, seed: int, evidence: Evidence | None = None) -> Iterator[Epoch]:
    """Train a head for cfg.epochs, yielding each epoch as it ends (the model keeps training after).

    Each record has train_loss, source_val_accuracy, every per-epoch
    validator's score (`validator_<name>`, on the unlabelled target train rows)
    and, with target val, target_val_accuracy; adaptation methods add
    adapt_loss. `evidence`: what the validators judge against
    (selection_evidence), when the caller shares it between heads.
    """
    torch.manual_seed(seed)
    data = with_importance_weights(cfg, data, seed)
    row_weight = torch.as_tensor(data.source_weights, dtype=torch.float32) if cfg.importance_weighting else None
    x, y = _tensor(data.source_train[0]), torch.as_tensor(data.source_train[1], dtype=torch.long)
    xt = _tensor(data.target_train) if data.target_train is not None else None
    has_labeled = data.target_labeled is not None and len(data.target_labeled[1]) > 0
    if has_labeled:
        xl, yl = _tensor(data.target_labeled[0]), torch.as_tensor(data.target_labeled[1], dtype=torch.long)
    evals = {"source_val": (_tensor(data.source_val[0]), torch.as_tensor(data.source_val[1], dtype=torch.long), "source")}
    if data.target_val is not None:
        evals["target_val"] = (_tensor(data.target_val[0]), torch.as_tensor(data.target_val[1], dtype=torch.long), "target")

    head = build_head(cfg, x.shape[1], num_classes)
    if cfg.domain_norm:
        head.fit_domain_norm(data.source_train[0], data.target_train)
    if cfg.feature_norm == "joint":
        if data.target_train is None:
            raise ValueError("head.feature_norm 'joint' needs unlabelled target train features")
        head.fit_joint_norm(data.source_train[0], data.target_train)
    adapt = build_adaptation_loss(
        cfg.method, head.embed_dim, num_classes, pseudo_threshold=cfg.pseudo_threshold, pseudo_labels=cfg.pseudo_labels, mcc_temperature=cfg.mcc_temperature
    )
    params = list(head.parameters()) + (list(adapt.parameters()) if adapt is not None else [])
    opt = build_optimizer(cfg, params)
    weight = class_weights(data.source_train[1], num_classes) if cfg.class_balanced else None
    gen = torch.Generator().manual_seed(seed)
    total_steps = cfg.epochs * steps_per_epoch(len(x), cfg.batch_size)

    # Without target rows (a source-only head from the Python API) there is nothing to validate on.
    if evidence is None and xt is not None:
        evidence = selection_evidence(data, num_classes, seed)
    # A hidden layer with BatchNorm sees source, labelled target and target rows in one pass
    # (a target batch is drawn even without an adaptation loss, so its statistics mix both domains).
    together = head.has_batchnorm and xt is not None
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        if adapt is not None and adapt.wants_refresh:
            with torch.no_grad():
                head.eval()
                f_all = head.embed(xt, "target")
                adapt.refresh(f_all, head.classifier(f_all))
        if adapt is not None:
            adapt.train()
        head.train()
        sums = {"train_loss": 0.0, "adapt_loss": 0.0}
        for idx in epoch_rows(cfg.sampler, data.source_train[1], gen).split(cfg.batch_size):
            step += 1
            if cfg.lr_schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(cfg, step, total_steps)
            if together:
                # Same draws, in the same order, as the separate passes below.
                l_idx = torch.randint(len(xl), (min(len(idx), len(xl)),), generator=gen) if has_labeled else None
                t_idx = torch.randint(len(xt), (len(idx),), generator=gen)
                batches = [(x[idx], "source")] + ([(xl[l_idx], "target")] if has_labeled else []) + [(xt[t_idx], "target")]
                embedded = head.embed_together(batches)
                f_s, f_t = embedded[0], embedded[-1]
            else:
                f_s = head.embed(x[idx], "source")
            logits_s = head.classifier(f_s)
            loss = source_loss(logits_s, y[idx], weight, cfg.effective_label_smoothing, row_weight[idx] if row_weight is not None else None)
            if has_labeled:
                if not together:
                    l_idx = torch.randint(len(xl), (min(len(idx), len(xl)),), generator=gen)
                logits_l = head.classifier(embedded[1] if together else head.embed(xl[l_idx], "target"))
                loss = loss + F.cross_entropy(logits_l, yl[l_idx], weight=weight, label_smoothing=cfg.effective_label_smoothing)
            if adapt is not None:
                adapt.set_progress(step / total_steps)
                if not together:
                    t_idx = torch.randint(len(xt), (len(idx),), generator=gen)
                    f_t = head.embed(xt[t_idx], "target")
                adapt_loss = adapt(f_s, f_t, logits_s, head.classifier(f_t), index_t=t_idx)
                loss = loss + cfg.adapt_weight * adapt_loss
                sums["adapt_loss"] += adapt_loss.item() * len(idx)
            value = loss.item()
            check_loss(
                value,
                f"head training (method {cfg.method}), step {step} of {total_steps}, epoch {epoch} of {cfg.epochs}",
                f"lower head.lr (now {cfg.lr}), head.weight_decay (now {cfg.weight_decay}) or head.adapt_weight (now {cfg.adapt_weight})",
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["train_loss"] += value * len(idx)
        record = {"train_loss": sums["train_loss"] / len(x)}
        if adapt is not None:
            record["adapt_loss"] = sums["adapt_loss"] / len(x)
        for name, (vx, vy, domain) in evals.items():
            record[f"{name}_accuracy"] = accuracy_of(head, vx, vy, domain)
        outputs = None
        if evidence is not None:
            outputs = outputs_of(head, evals["source_val"][0], xt)
            for name in EPOCH_VALIDATORS:
                record[f"{VALIDATOR_PREFIX}{name}"] = float(score(name, [outputs], evidence)[0])
        yield Epoch(epoch, record, head, outputs)


def add_ensv(history: list[dict[str, float]], outputs: list[Outputs], evidence: Evidence) -> None:
    """ensv ranks each epoch against all of them: scored once the epochs are known."""
    for record, value in zip(history, score("ensv", outputs, evidence)):
        record[f"{VALIDATOR_PREFIX}ensv"] = float(value)


def train_head(
    cfg: HeadConfig,
    data: HeadData,
    num_classes: int,
    seed: int,
    on_epoch: EpochCallback | None = None,
    evidence: Evidence | None = None,
) -> tuple[HeadNet, list[dict[str, float]]]:
    """Train a head (head_epochs); return it at the epoch `cfg.selection` keeps, and every epoch's record.

    Target val is only used to choose the epoch under the oracle rule
    `selection: target_val`.
    """
    needs_target = (
        cfg.method != "source_only"
        or cfg.domain_norm
        or cfg.feature_norm == "joint"
        or cfg.importance_weighting
        or cfg.selection not in ("source_val", "target_val", "last")
    )
    if needs_target and data.target_train is None:
        raise ValueError(
            f"head.method {cfg.method!r}, selection {cfg.selection!r} (or domain_norm, feature_norm joint, importance_weighting) needs unlabelled target train features"
        )
    if cfg.selection == "target_val" and data.target_val is None:
        raise ValueError("head.selection 'target_val' needs labelled target val features")
    if evidence is None and data.target_train is not None:
        evidence = selection_evidence(data, num_classes, seed)
    key = selection_key(cfg.selection)
    # ensv ranks an epoch against all of them, so every epoch is kept until the end.
    keep_all = cfg.selection == "ensv"
    best_score, best_state, history, since_best = -np.inf, None, [], 0
    states, epoch_outputs = [], []
    for epoch in head_epochs(cfg, data, num_classes, seed, evidence):
        head, record = epoch.head, epoch.record
        history.append(record)
        if epoch.outputs is not None:
            epoch_outputs.append(epoch.outputs)
        if on_epoch:
            on_epoch(epoch.number, record)
        if keep_all:
            states.append(copy.deepcopy(head.state_dict()))
            continue
        # `>=`: ties go to the later epoch (see pick_epoch); `last` takes every epoch.
        if cfg.selection == "last" or record[key] >= best_score:
            best_score, best_state, since_best = record.get(key, best_score), copy.deepcopy(head.state_dict()), 0
        else:
            since_best += 1
            if cfg.patience is not None and since_best >= cfg.patience:
                break
    if evidence is not None:
        add_ensv(history, epoch_outputs, evidence)
    if keep_all:
        best_state = states[pick_epoch(cfg.selection, history) - 1]
    head.load_state_dict(best_state)
    return head.eval(), history


def best_epoch(cfg: HeadConfig, history: list[dict[str, float]]) -> int:
    """1-based epoch train_head kept."""
    return pick_epoch(cfg.selection, history)


@torch.no_grad()
def predict_logits(head: HeadNet, features: np.ndarray, domain: str, batch_size: int = 4096) -> np.ndarray:
    head.eval()
    out = [head(_tensor(features[i : i + batch_size]), domain).numpy() for i in range(0, len(features), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, head.classifier.out_features), np.float32)


def predict_proba(head: HeadNet, features: np.ndarray, domain: str, batch_size: int = 4096) -> np.ndarray:
    logits = torch.as_tensor(predict_logits(head, features, domain, batch_size))
    return F.softmax(logits, 1).numpy()


@torch.no_grad()
def embed(head: HeadNet, features: np.ndarray, domain: str, batch_size: int = 4096) -> np.ndarray:
    """The representation the classifier sees (what adaptation aligns)."""
    head.eval()
    return np.concatenate([head.embed(_tensor(features[i : i + batch_size]), domain).numpy() for i in range(0, len(features), batch_size)])


HEAD_WEIGHTS_FILE = "head.pt"
# Under the head stage's folder: one folder per fusion backbone (xfer.config.member_name).
MEMBERS_DIR = "members"
# fusion.mode features: the head on every backbone's features side by side, in <head dir>/feature_fusion/.
FEATURE_FUSION = "feature_fusion"
HEAD_SPEC_FILE = "head.json"


def save_head(out_dir, head: HeadNet, cfg: HeadConfig, in_dim: int, class_names: list[str], features_key: str, selection: dict | None = None) -> None:
    """`selection`: how the head was chosen (xfer.metrics.selection_lines), for the evaluation report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    save_torch(out_dir / HEAD_WEIGHTS_FILE, state)
    spec = {"head": cfg.model_dump(), "in_dim": in_dim, "num_classes": len(class_names), "class_names": class_names, "features_key": features_key}
    if selection is not None:
        spec["selection"] = selection
    write_json(out_dir / HEAD_SPEC_FILE, spec)


def load_head(model_dir) -> tuple[HeadNet, dict]:
    model_dir = Path(model_dir)
    for f in (HEAD_WEIGHTS_FILE, HEAD_SPEC_FILE):
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"{model_dir / f} not found (run the head stage)")
    spec = json.loads((model_dir / HEAD_SPEC_FILE).read_text())
    head = build_head(HeadConfig(**spec["head"]), spec["in_dim"], spec["num_classes"])
    head.load_state_dict(torch.load(model_dir / HEAD_WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return head.eval(), spec
