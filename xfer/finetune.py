"""Fine-tuning the network on images, by a strategy (xfer/strategies.py).

The default, LP-FT: a linear probe on cached features first, then every
weight moves; starting the classifier from the probe keeps the random-head
gradients from wrecking the pretrained features in the first steps. The loop
checkpoints every epoch (xfer/checkpoints.py) and resumes a killed run.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from xfer.adapt import build_adaptation_loss
from xfer.adapt.base import AdaptationLoss
from xfer.checkpoints import load_checkpoint, remove_checkpoint, rng_state, save_checkpoint, set_rng_state
from xfer.config import FinetuneConfig, HeadConfig
from xfer.data.images import Preprocessing
from xfer.features import worker_context
from xfer.heads import build_head, check_loss, selection_key
from xfer.io import save_torch, write_json
from xfer.samplers import torch_sampler
from xfer.strategies import apply_freezing, backbone_groups, check_strategy, frozen_groups, param_groups

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
# An epoch's label-free scores: (the model, its class probabilities on source val) ->
# {"validator_<name>": score}; built by the stage, which holds the target rows and features.
EpochJudge = Callable[[nn.Module, np.ndarray], dict[str, float]]


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


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or the only process: the one that logs and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(requested)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 keeps fp32's range, so no loss scaling is needed; GPUs without it get fp16 (and a scaler)."""
    return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, amp: bool = True):
    # The CPU stays fp32, for exactness.
    return torch.autocast("cuda", dtype=amp_dtype(device), enabled=amp and device.type == "cuda")


@torch.inference_mode()
def predict_logits(
    model: nn.Module, data: Dataset, batch_size: int, device: torch.device, progress: bool = False, desc: str = "predict", amp: bool = True
) -> tuple[np.ndarray, np.ndarray]:
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


def keeps(selection: str, record: dict[str, float], best: float | None) -> bool:
    """Whether this epoch replaces the kept one: `last` always; else a score at least the best so far.

    Ties go to the later epoch, as for the head (xfer.heads.pick_epoch): the same rule.
    """
    return selection == "last" or best is None or record[selection_key(selection)] >= best


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
    checkpoint_dir: Path | None = None,
    run_key: str = "",
    target: Dataset | None = None,
    target_plain: Dataset | None = None,
    judge: EpochJudge | None = None,
    keep_checkpoint: bool = False,
    row_weights: np.ndarray | None = None,
) -> tuple[Classifier, list[dict[str, float]]]:
    """Fine-tune by `cfg.strategy`; keep the epoch (0 = the start) `cfg.selection` ranks first.

    Each epoch's record holds its source val accuracy, the `monitor` sets'
    accuracies and, with `judge`, every validator's label-free score; a
    selection by a validator needs `judge`, by target_val a `target_val` monitor.

    With `checkpoint_dir`, the state after every epoch is saved there, and a
    checkpoint of the same `run_key` left by a killed run is resumed. It is
    removed at the end unless `keep_checkpoint`: then the caller removes it
    once the model is saved, so a kill in between resumes at the last epoch
    instead of training again.
    With `cfg.method` other than source_only, `target` (unlabelled target
    rows, augmented like `train`) feeds the adaptation loss; `target_plain`,
    the same rows unaugmented, is what self-training labels each epoch.
    `row_weights` (one per `train` row; finetune.importance_weighting) scale each
    row's chance of being drawn, on top of `cfg.sampler`'s.
    """
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic or previous_determinism)
    try:
        return _finetune(
            model,
            train,
            val,
            cfg,
            device,
            seed,
            monitor or {},
            on_epoch,
            progress,
            checkpoint_dir,
            run_key,
            target,
            target_plain or target,
            judge,
            keep_checkpoint,
            row_weights,
        )
    finally:
        torch.use_deterministic_algorithms(previous_determinism)


def _finetune(
    model, train, val, cfg, device, seed, monitor, on_epoch, progress, checkpoint_dir, run_key, target, target_plain, judge, keep_checkpoint, row_weights
):
    if cfg.selection not in ("source_val", "last", "target_val") and judge is None:
        raise ValueError(f"finetune.selection {cfg.selection!r} is a validator: it needs unlabelled target rows to score each epoch on")
    if cfg.selection == "target_val" and "target_val" not in monitor:
        raise ValueError("finetune.selection target_val needs the labelled target val rows")
    torch.manual_seed(seed)
    model.to(device)
    groups = backbone_groups(model.backbone)
    check_strategy(cfg, model.backbone)
    adaptation = TargetAdaptation.build(cfg, model, target, target_plain, seed, device)
    groups_to_train = param_groups(model, cfg)
    if adaptation is not None and any(True for _ in adaptation.loss.parameters()):  # DANN/CDAN discriminators
        groups_to_train.append({"params": list(adaptation.loss.parameters()), "lr": cfg.lr * cfg.head_lr_scale, "name": "adaptation"})
    opt = torch.optim.AdamW(groups_to_train, weight_decay=cfg.weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=True) if world_size() > 1 else None
    if sampler is not None:
        broadcast_state(model)
    loader = train_loader(train, cfg, device, shuffle, sampler, row_weights)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda" and amp_dtype(device) == torch.float16)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    # Compiled views share the weights (and state_dict keys) of the modules they wrap.
    network, backbone_forward = (torch.compile(model), torch.compile(model.backbone)) if cfg.compile else (model, model.backbone)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    total_steps = max(cfg.epochs * steps_per_epoch, 1)

    def evaluate(epoch: int, train_loss: float | None) -> dict[str, float]:
        with ema.applied(model) if ema is not None else contextlib.nullcontext():
            logits, labels = predict_logits(model, val, cfg.batch_size * 2, device, amp=cfg.amp)
            record = {"source_val_accuracy": float((logits.argmax(1) == labels).mean())}
            if train_loss is not None:
                record["train_loss"] = train_loss
            for name, data in monitor.items():
                record[f"{name}_accuracy"] = _accuracy(model, data, cfg.batch_size * 2, device, cfg.amp)
            if judge is not None:
                record.update(judge(model, torch.softmax(torch.from_numpy(logits), 1).numpy()))
            state = copy.deepcopy(model.state_dict())
        if on_epoch and is_main_process():
            on_epoch(epoch, record)
        return record, state

    resumed = load_checkpoint(checkpoint_dir, run_key) if checkpoint_dir is not None else None
    if resumed is None:
        record, best_state = evaluate(0, None)
        history, best_score, since_best, first_epoch = [record], record.get(selection_key(cfg.selection)), 0, 1
    else:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if ema is not None:
            ema.state = resumed["ema"]
        if adaptation is not None:
            adaptation.load_state_dict(resumed["adaptation"])
        scaler.load_state_dict(resumed["scaler"])
        history, best_state, best_score, since_best = resumed["history"], resumed["best_state"], resumed["best_score"], resumed["since_best"]
        set_rng_state(resumed["rng"], shuffle)
        first_epoch = resumed["epoch"] + 1
        if is_main_process():
            log.warning("finetune: resuming the checkpoint in %s after epoch %d of %d", checkpoint_dir, resumed["epoch"], cfg.epochs)

    for epoch in range(first_epoch, cfg.epochs + 1):
        if cfg.patience is not None and since_best >= cfg.patience:
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
        if adaptation is not None:  # before train mode: self-training labels the target in eval mode
            adaptation.start_epoch(model, cfg.batch_size * 2, epoch)
        model.train()
        if cfg.freeze_bn:
            freeze_batchnorm(model)
        apply_freezing(model.backbone, groups, frozen_groups(cfg, len(groups), epoch))
        total, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"finetune epoch {epoch}/{cfg.epochs}", unit="step", disable=not progress)
        # islice, not a break: a break would load one batch too many.
        for step, (x, y) in enumerate(itertools.islice(loader, steps_per_epoch), start=(epoch - 1) * steps_per_epoch + 1):
            x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                if adaptation is None:
                    loss = loss_fn(network(x).float(), y)
                else:
                    features_s = model.head.embed(backbone_forward(x), "source")
                    logits_s = model.head.classifier(features_s)
                    adapt_loss = adaptation.loss_on_batch(model, backbone_forward, features_s, logits_s, step / total_steps, memory_format)
                    loss = loss_fn(logits_s.float(), y) + cfg.adapt_weight * adapt_loss
            value = loss.item()
            check_loss(
                value,
                f"fine-tuning ({cfg.strategy}, method {cfg.method}), step {step} of {total_steps}, epoch {epoch} of {cfg.epochs}",
                f"lower finetune.lr (now {cfg.lr}), finetune.weight_decay (now {cfg.weight_decay}) or finetune.adapt_weight (now {cfg.adapt_weight})",
            )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            average_gradients(opt)
            scaler.step(opt)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            total += value * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        if world_size() > 1:
            broadcast_state(model, buffers_only=True)  # BatchNorm statistics, if they train, from rank 0
        record, state = evaluate(epoch, total / max(seen, 1))
        history.append(record)
        # `last` keeps the final epoch: source val saturates early and would keep the probe.
        score = record.get(selection_key(cfg.selection))
        # Patience counts epochs without a strictly better score; a tie is still kept.
        since_best = 0 if best_score is None or score > best_score else since_best + 1
        if keeps(cfg.selection, record, best_score):
            best_score, best_state = score, state
        if checkpoint_dir is not None and is_main_process():
            save_checkpoint(
                checkpoint_dir,
                {
                    "key": run_key,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state if ema is not None else None,
                    "history": history,
                    "best_state": best_state,
                    "best_score": best_score,
                    "since_best": since_best,
                    "rng": rng_state(shuffle),
                    "adaptation": adaptation.state_dict() if adaptation is not None else None,
                    "scaler": scaler.state_dict(),
                },
            )
    for param in model.parameters():
        param.requires_grad_(True)
    model.load_state_dict(best_state)
    if is_main_process() and not keep_checkpoint:
        remove_checkpoint(checkpoint_dir)
    return model.eval(), history


def dataset_labels(data: Dataset) -> np.ndarray:
    """Every row's label, without decoding an image where the dataset lists them (ImageRows)."""
    labels = getattr(data, "labels", None)
    if labels is None:
        labels = [int(data[i][1]) for i in range(len(data))]
    return np.asarray(labels, dtype=np.int64)


def train_loader(
    train: Dataset,
    cfg: FinetuneConfig,
    device: torch.device,
    generator: torch.Generator,
    sampler: DistributedSampler | None,
    row_weights: np.ndarray | None = None,
) -> DataLoader:
    """Shuffled batches by the seeded generator (or the rank's shard), decoded by `cfg.num_workers` processes.

    With `cfg.sampler` other than uniform (one process only: the config refuses it with
    devices > 1), the batches are weighted draws (xfer/samplers/) from the same generator,
    whose state the checkpoint keeps: a resumed run draws the same rows. `row_weights`
    (importance weighting) multiply each row's chance of being drawn, so they too
    make the batches weighted draws.

    Workers start from a fork server (xfer.features.worker_context) and live
    across epochs; each draws its augmentations from a seed the generator
    gives it, so a resumed run decodes the same batches.
    """
    workers = cfg.num_workers
    if row_weights is not None and len(row_weights) != len(train):
        raise ValueError(f"{len(row_weights)} row weights for {len(train)} training rows")
    if sampler is None and (cfg.sampler != "uniform" or row_weights is not None):  # uniform needs no labels: nothing is read for them
        sampler = torch_sampler(cfg.sampler, dataset_labels(train), generator, row_weights)
    return DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train) // world_size() > cfg.batch_size,
        generator=generator,
        num_workers=workers,
        multiprocessing_context=worker_context() if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )


def average_gradients(opt: torch.optim.Optimizer) -> None:
    """Data parallelism: every rank steps with the mean of all ranks' gradients.

    Done by hand rather than by wrapping in DistributedDataParallel, because the
    set of trainable weights changes between epochs (gradual, partial) and the
    adaptation losses run the backbone twice per step; one all-reduce per
    gradient tensor handles both.
    """
    if world_size() == 1:
        return
    for group in opt.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(world_size())


def broadcast_state(model: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's weights (or BatchNorm statistics) on every rank."""
    tensors = list(model.buffers()) if buffers_only else [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


class WithIndex(Dataset):
    """(image, row number): what self-training needs to look up a row's pseudo-label."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i][0], i


class TargetAdaptation:
    """An adaptation loss of xfer/adapt/ fed with unlabelled target batches while fine-tuning.

    The target rows are drawn by their own seeded generator, a fresh pass each
    epoch, so a resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(self, loss: AdaptationLoss, target: Dataset, target_plain: Dataset, batch_size: int, seed: int, device: torch.device):
        self.loss = loss.to(device)
        self.target_plain, self.device = target_plain, device
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.sampler = DistributedSampler(target, shuffle=True, seed=seed + 1, drop_last=True) if world_size() > 1 else None
        self.loader = DataLoader(
            WithIndex(target),
            batch_size=batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            drop_last=len(target) // world_size() > batch_size,
            generator=self.generator,
        )
        self.batches = iter(())
        self.passes = 0

    @classmethod
    def build(cls, cfg: FinetuneConfig, model: Classifier, target, target_plain, seed: int, device) -> "TargetAdaptation | None":
        if cfg.method == "source_only":
            return None
        if target is None or len(target) == 0:
            raise ValueError(f"finetune.method {cfg.method!r} needs unlabelled target images (the target 'unlabeled' split is empty)")
        loss = build_adaptation_loss(
            cfg.method,
            model.head.embed_dim,
            model.head.classifier.out_features,
            pseudo_threshold=cfg.pseudo_threshold,
            pseudo_labels=cfg.pseudo_labels,
            mcc_temperature=cfg.mcc_temperature,
        )
        return cls(loss, target, target_plain, cfg.batch_size, seed, device)

    def start_epoch(self, model: Classifier, batch_size: int, epoch: int) -> None:
        self.passes = epoch * 1000  # distinct, reproducible shard orders per epoch and pass
        self.batches = self.new_pass()
        self.loss.train()
        if self.loss.wants_refresh:
            features, logits = embed_rows(model, self.target_plain, batch_size, self.device)
            self.loss.refresh(features, logits)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:  # the target set is smaller than the source: another pass
            self.batches = self.new_pass()
            return next(self.batches)

    def new_pass(self):
        if self.sampler is not None:
            self.passes += 1
            self.sampler.set_epoch(self.passes)
        return iter(self.loader)

    def loss_on_batch(
        self, model: Classifier, backbone_forward, features_s: torch.Tensor, logits_s: torch.Tensor, progress: float, memory_format=torch.contiguous_format
    ) -> torch.Tensor:
        x_t, index_t = self.next_batch()
        features_t = model.head.embed(backbone_forward(x_t.to(self.device, non_blocking=True, memory_format=memory_format)), "target")
        self.loss.set_progress(progress)
        return self.loss(features_s, features_t, logits_s, model.head.classifier(features_t), index_t=index_t.to(self.device))

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.generator.set_state(state["generator"])


@torch.no_grad()
def embed_rows(model: Classifier, data: Dataset, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input features and logits of every row, in eval mode."""
    model.eval()
    features = torch.cat([model.head.embed(model.backbone(x.to(device)), "target") for x, _ in DataLoader(data, batch_size=batch_size)])
    return features, model.head.classifier(features)


def lr_factor(cfg: FinetuneConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of each group's lr at optimiser step `step`: linear warmup, then constant or cosine to 0."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = max(cfg.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


class WeightEMA:
    """An exponential moving average of a model's weights (buffers copied as they are)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.state[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.state[key].copy_(value)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The model with the averaged weights inside the block, its own weights after."""
        own = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(own)


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
