"""The finetune stage's work, without tracking: in the stage's own process, or in each torchrun worker.

    python -m torch.distributed.run --standalone --nproc_per_node N -m xfer.finetune_job --root .

is what the stage launches for `finetune.devices > 1` (tasks/finetune.py).
Every rank trains on its shard of each batch and gradients are averaged
(xfer/finetune.py); only rank 0 writes models/finetune/, metrics/finetune.json
and the per-epoch history the stage then logs to MLflow.

The linear probe is trained here, on the cached source features, not taken
from the head stage: the head may be adapted, an MLP, or selected by an
oracle, and a change to any of that must not rerun fine-tuning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.utils.data import ConcatDataset, Dataset

from xfer import features as feats
from xfer.backbones import create_backbone
from xfer.checkpoints import remove_checkpoint
from xfer.config import LINEAR_PROBE, FinetuneConfig, HeadConfig, Params, load_params
from xfer.contract import stage_params
from xfer.data.augment import Augmentation, FourierStyle, build_augmentation
from xfer.data.images import ImageRows
from xfer.data.split import class_names, read_manifest, rows
from xfer.finetune import Classifier, ClassifierSpec, EpochCallback, EpochJudge, finetune, is_main_process, predict_logits, save_classifier, select_device
from xfer.heads import EPOCH_VALIDATORS, VALIDATOR_PREFIX, HeadData, build_head, pick_epoch, train_head
from xfer.importance import ImportanceWeights, importance_weights
from xfer.io import sha256_file, sha256_json, write_json
from xfer.layout import Layout
from xfer.metrics import softmax
from xfer.procs import OWNER_ENV, check_owner, set_parent_death_signal
from xfer.strategies import PROBE_STARTED
from xfer.translate_stage import published_key, translated_rows
from xfer.validators import Evidence, Outputs, score

HISTORY_FILE = "history.json"
# Bumped when a checkpoint's contents change meaning: an older run's checkpoint is then not resumed.
CHECKPOINT_FORMAT = 2


@dataclass
class FinetuneResult:
    model: Classifier
    spec: ClassifierSpec
    summary: dict
    history: list[dict[str, float]]


def checkpoint_dir(layout: Layout) -> Path:
    return layout.checkpoints / "finetune"


def history_path(layout: Layout) -> Path:
    """Where rank 0 of a torchrun job leaves the per-epoch records for the stage to log."""
    return checkpoint_dir(layout) / HISTORY_FILE


def run(layout: Layout, params: Params, on_epoch: EpochCallback | None = None, progress: bool = True, keep_checkpoint: bool = False) -> FinetuneResult:
    """Probe, build, fine-tune; on rank 0, write models/finetune/ and metrics/finetune.json.

    The checkpoint is removed only after both are written (never before: a kill
    in between would train again from epoch 1); with `keep_checkpoint` it is
    left for the caller (the stage, which still logs the model) to remove.
    """
    requested = params.finetune.method
    cfg = resolve_method(params.finetune, layout.head_pick)
    params = params.model_copy(update={"finetune": cfg})
    device = local_device(cfg.device)
    manifest = read_manifest(layout.manifest)
    names = class_names(manifest)
    fs = feats.load_current(layout.features_current)
    # The probe learns from source labels alone, whatever head.method the head stage uses.
    probe_cfg = HeadConfig(**(LINEAR_PROBE | {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr}))
    if cfg.strategy in PROBE_STARTED:
        probe, _ = train_head(probe_cfg, HeadData(fs.select("source", "train"), fs.select("source", "val")), len(names), params.seed)
    else:  # `full`: a fresh classifier, the baseline LP-FT is measured against
        torch.manual_seed(params.seed)
        probe = build_head(probe_cfg, fs.features.shape[1], len(names))
    backbone, prep, weights = create_backbone(params.backbone, num_classes=0)
    model = Classifier(backbone, probe)
    run_key = sha256_json(
        {
            "params": stage_params(params, "finetune"),
            "requested_method": requested,
            "weights": weights.digest,
            "manifest": sha256_file(layout.manifest),
            "features": fs.meta["key"],
            # Which translation the source images are (none: the run key is what it always was).
            **({"translated": published_key(layout.translated)} if cfg.source_images != "original" else {}),
            "checkpoint_format": CHECKPOINT_FORMAT,
        }
    )
    augment, source_augment = build_augmentation(cfg.augment), source_augmentation(manifest, cfg, layout.root)

    def data(role: str, split: str, train: bool = False) -> ImageRows:
        part = rows(manifest, role, split)
        return ImageRows(part.path.tolist(), part.label.tolist(), prep, layout.root, augment=augment if train else None)

    source_rows = source_train_rows(layout, manifest, cfg.source_images)
    source_rows = ImageRows(source_rows.path.tolist(), source_rows.label.tolist(), prep, layout.root, augment=source_augment)
    train = training_set(source_rows, data("target", "train", train=True), cfg.labeled_target_repeats)
    weights = source_importance(fs, manifest, cfg, params.seed)
    # Labelled target rows are target already: weight 1.
    row_weights = None if weights is None else np.r_[weights.weights, np.ones(len(train) - weights.weights.size)]
    adapting = cfg.method != "source_only"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, history = finetune(
        model,
        train,
        data("source", "val"),
        cfg,
        device,
        params.seed,
        monitor={"target_val": data("target", "val")},
        on_epoch=on_epoch,
        progress=progress and is_main_process(),
        checkpoint_dir=checkpoint_dir(layout),
        run_key=run_key,
        target=data("target", "unlabeled", train=True) if adapting else None,
        target_plain=data("target", "unlabeled") if adapting else None,
        judge=epoch_judge(manifest, fs, prep, layout.root, cfg, device, len(names), params.seed),
        keep_checkpoint=True,
        row_weights=row_weights,
    )
    spec = ClassifierSpec(
        backbone=params.backbone.name,
        head=probe_cfg.model_dump(),
        feature_dim=fs.features.shape[1],
        num_classes=len(names),
        class_names=names,
        preprocessing=prep.as_dict(),
    )
    # The epoch the loop kept (history[0] is epoch 0, the probe), by the loop's own rule.
    kept = pick_epoch(cfg.selection, history) - 1
    best = history[kept]
    summary = {
        "strategy": cfg.strategy,
        "method": cfg.method,
        "method_requested": requested,
        "selection": cfg.selection,
        "best_epoch": kept,
        "source_val_accuracy": best["source_val_accuracy"],
        "target_val_accuracy": best["target_val_accuracy"],
        "validators": {k.removeprefix(VALIDATOR_PREFIX): v for k, v in best.items() if k.startswith(VALIDATOR_PREFIX)},
        "probe_source_val_accuracy": history[0]["source_val_accuracy"],
        "epochs": cfg.epochs,
        "device": device.type,
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
    }
    if weights is not None:
        summary["importance_weights"] = weights.summary()
    if device.type == "cuda":
        summary["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if is_main_process():
        check_owner("write models/finetune")  # a torchrun worker outliving its stage writes nothing
        save_classifier(layout.finetune_dir, model, spec)
        write_json(layout.metrics("finetune"), summary)
        if not keep_checkpoint:
            remove_checkpoint(checkpoint_dir(layout))
    return FinetuneResult(model, spec, summary, history)


def epoch_judge(
    manifest, fs: feats.FeatureSet, prep, images_root: Path, cfg: FinetuneConfig, device: torch.device, num_classes: int, seed: int
) -> EpochJudge | None:
    """Every validator's score for an epoch's model, on at most `cfg.validator_rows` unlabelled target rows.

    The rows are a seeded sample (the same every epoch), so scores compare across
    epochs; the evidence (DEV's weights, ClassAMI's clusters) is the frozen
    backbone's cached features of those rows, computed once. None without
    unlabelled target rows.
    """
    part = rows(manifest, "target", "unlabeled")
    if len(part) == 0:
        return None
    x_target, _ = fs.select("target", "unlabeled")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(part))[: cfg.validator_rows])
    target = ImageRows(part.path.iloc[chosen].tolist(), part.label.iloc[chosen].tolist(), prep, images_root)
    x_val, y_val = fs.select("source", "val")
    evidence = Evidence(
        source_val_labels=y_val,
        source_val_features=x_val,
        target_features=x_target[chosen],
        source_train_features=fs.select("source", "train")[0],
        num_classes=num_classes,
        seed=seed,
    )

    def judge(model, source_val: np.ndarray) -> dict[str, float]:
        # A forked RNG: a DataLoader draws its seed from torch's global generator, and scoring
        # an epoch must leave training exactly as it would have gone unscored.
        with torch.random.fork_rng(devices=[]):
            logits, _ = predict_logits(model, target, cfg.batch_size * 2, device, amp=cfg.amp)
        outputs = [Outputs(target=softmax(logits), source_val=source_val)]
        return {f"{VALIDATOR_PREFIX}{name}": float(score(name, outputs, evidence)[0]) for name in EPOCH_VALIDATORS}

    return judge


def resolve_method(cfg: FinetuneConfig, head_pick: Path) -> FinetuneConfig:
    """`method: auto` becomes the head stage's kept method and knob (models/head_pick.json):
    fine-tuning every candidate is too costly on a CPU, so the cheap search on cached features decides."""
    if cfg.method != "auto":
        return cfg
    if not head_pick.is_file():
        raise FileNotFoundError(f"finetune.method auto takes the head stage's pick, and {head_pick} is missing: run the head stage first")
    pick = json.loads(head_pick.read_text())
    if not pick:
        raise ValueError(f"{head_pick} holds no pick: the head stage ran with another finetune.method; run the head stage again")
    try:
        return FinetuneConfig(**(cfg.model_dump() | pick))
    except ValidationError as err:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ValueError(f"finetune.method auto: the head's pick {pick} does not fit this finetune section: {reasons}") from None


def source_augmentation(manifest, cfg: FinetuneConfig, root: Path) -> Augmentation | None:
    """The source train images' augmentation: the others' and, with finetune.augment.fda, the style
    of a random unlabelled target train image (never a val or test image)."""
    style = FourierStyle(cfg.augment.fda, rows(manifest, "target", "unlabeled").path.tolist(), root) if cfg.augment.fda else None
    return build_augmentation(cfg.augment, style)


def source_train_rows(layout: Layout, manifest, source_images: str):
    """The source train rows fine-tuning sees (path relative to the project root, label): the
    manifest's (original), the translate stage's copies of them (translated), or both, each row
    twice, originals first."""
    original = rows(manifest, "source", "train")[["path", "label"]]
    if source_images == "original":
        return original
    translated = translated_rows(layout, rows(manifest, "source", "train"))
    return translated if source_images == "translated" else pd.concat([original, translated], ignore_index=True)


def source_importance(fs: feats.FeatureSet, manifest, cfg: FinetuneConfig, seed: int) -> ImportanceWeights | None:
    """finetune.importance_weighting: the source train images' weights, from the cached features of
    them and of the unlabelled target images (the frozen backbone's, as the head's are)."""
    if not cfg.importance_weighting:
        return None
    source = fs.index[(fs.index.role == "source") & (fs.index.split == "train")]
    if source.path.tolist() != rows(manifest, "source", "train").path.tolist():
        raise ValueError("the cached features' source train rows are not the manifest's: rerun the features stage (dvc repro features)")
    return importance_weights(fs.select("source", "train")[0], fs.select("target", "unlabeled")[0], cfg.importance_max_weight, seed)


def training_set(source: Dataset, labeled_target: Dataset, repeats: int) -> Dataset:
    """The source rows and the labelled target budget (if any), each target row `repeats` times."""
    if len(labeled_target) == 0:
        return source
    return ConcatDataset([source] + [labeled_target] * repeats)


def local_device(requested: str) -> torch.device:
    """This process's device: under torchrun, CUDA rank r takes GPU LOCAL_RANK."""
    device = select_device(requested)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xfer.finetune_job", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    layout = Layout(Path(args.root))
    params = load_params(layout.params)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if os.environ.get(OWNER_ENV):
        # A worker of the finetune stage: die with torchrun (which dies with the stage).
        set_parent_death_signal(signal.SIGKILL)
        check_owner("start")
    if distributed:
        # gloo on CPUs (and in tests), NCCL between GPUs.
        backend = "nccl" if select_device(params.finetune.device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    try:
        # The stage that launched this job removes the checkpoint once it has logged the model.
        result = run(layout, params, progress=True, keep_checkpoint=True)
        if is_main_process():
            check_owner("write the history")
            write_json(history_path(layout), result.history)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def read_history(layout: Layout) -> list[dict[str, float]]:
    path = history_path(layout)
    history = json.loads(path.read_text())
    path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()
    return history


if __name__ == "__main__":
    sys.exit(main())
