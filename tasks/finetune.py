"""finetune stage: the whole network, its classifier started from a linear probe (LP-FT).

The probe is trained here, on the cached source features, not taken from the
head stage: the head may be adapted, an MLP, or selected by an oracle, and a
change to any of that must not rerun fine-tuning.
"""

from __future__ import annotations

import time

import mlflow
import numpy as np
import timm
import torch
from mlflow.models import infer_signature
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch.utils.data import ConcatDataset

from tasks.tracking import stage_run
from xfer import features as feats
from xfer.backbones import create_backbone
from xfer.config import HeadConfig, Params
from xfer.data.augment import build_augmentation
from xfer.data.images import ImageRows
from xfer.data.split import class_names, read_manifest, rows
from xfer.finetune import Classifier, ClassifierSpec, finetune as run_finetune, save_classifier, select_device
from xfer.heads import HeadData, build_head, train_head
from xfer.io import sha256_file, sha256_json, write_json
from xfer.layout import Layout
from xfer.strategies import PROBE_STARTED


def log_model(model: Classifier, spec: ClassifierSpec) -> None:
    """The fine-tuned model as an MLflow pytorch model with a signature."""
    model = model.cpu().eval()
    size = spec.preprocessing["image_size"]
    # Batch of 2: torch.export pins a size-1 dimension, and the logged model must take any batch.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        # Explicit requirements skip MLflow's slow import-scanning inference.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", f"numpy=={np.__version__}"],
    )


@task(name="finetune", cache_policy=NO_CACHE)
def finetune(layout: Layout, params: Params) -> dict:
    logger = get_run_logger()
    cfg = params.finetune
    with stage_run("finetune", layout, params, ["seed", "backbone", "finetune"]) as run:
        with run.work():
            device = select_device(cfg.device)
            logger.info("fine-tuning on %s", device)
            manifest = read_manifest(layout.manifest)
            names = class_names(manifest)
            fs = feats.load_current(layout.features)
            probe_cfg = HeadConfig(kind="linear", epochs=cfg.probe_epochs, lr=cfg.probe_lr)
            if cfg.strategy in PROBE_STARTED:
                probe, _ = train_head(probe_cfg, HeadData(fs.select("source", "train"), fs.select("source", "val")), len(names), params.seed)
            else:  # `full`: a fresh classifier, the baseline LP-FT is measured against
                torch.manual_seed(params.seed)
                probe = build_head(probe_cfg, fs.features.shape[1], len(names))
            backbone, prep, weights = create_backbone(params.backbone, num_classes=0)
            model = Classifier(backbone, probe)
            run_key = sha256_json({"params": params.section("seed", "backbone", "finetune"), "weights": weights.digest, "manifest": sha256_file(layout.manifest), "features": fs.meta["key"]})

            augment = build_augmentation(cfg.augment)

            def data(role: str, split: str, train: bool = False) -> ImageRows:
                part = rows(manifest, role, split)
                return ImageRows(part.path.tolist(), part.label.tolist(), prep, layout.root, augment=augment if train else None)

            # The labelled target budget (if any) trains with the source rows.
            train = data("source", "train", train=True)
            if len(rows(manifest, "target", "train")):
                train = ConcatDataset([train, data("target", "train", train=True)])
            model, history = run_finetune(
                model,
                train,
                data("source", "val"),
                cfg,
                device,
                params.seed,
                monitor={"target_val": data("target", "val")},
                on_epoch=run.epoch_logger("finetune"),
                checkpoint_dir=layout.checkpoints / "finetune",
                run_key=run_key,
                target=data("target", "unlabeled", train=True) if cfg.method != "source_only" else None,
                target_plain=data("target", "unlabeled") if cfg.method != "source_only" else None,
            )
            spec = ClassifierSpec(
                backbone=params.backbone.name,
                head=probe_cfg.model_dump(),
                feature_dim=fs.features.shape[1],
                num_classes=len(names),
                class_names=names,
                preprocessing=prep.as_dict(),
            )
            save_classifier(layout.finetune_dir, model, spec)
            best = max(history, key=lambda r: r["val_accuracy"])
            summary = {
                "strategy": cfg.strategy,
                "method": cfg.method,
                "best_epoch": history.index(best),
                "source_val_accuracy": best["val_accuracy"],
                "target_val_accuracy": best["target_val_accuracy"],
                "probe_source_val_accuracy": history[0]["val_accuracy"],
                "epochs": cfg.epochs,
                "device": device.type,
            }
            write_json(layout.metrics("finetune"), summary)
        run.log_metrics(summary, prefix="best.")
        run.log_artifact(layout.metrics("finetune"))
        started = time.perf_counter()
        log_model(model, spec)
        run.log_metrics({"time.log_model_s": time.perf_counter() - started})
    return summary
