"""finetune stage: the whole network, classifier initialised from the head."""

from __future__ import annotations

import time

import mlflow
import numpy as np
import timm
import torch
from mlflow.models import infer_signature
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import stage_run
from xfer.backbones import create_backbone
from xfer.config import Params
from xfer.data.images import ImageRows
from xfer.data.split import read_manifest, rows
from xfer.finetune import Classifier, ClassifierSpec, finetune as run_finetune, save_classifier, select_device
from xfer.heads import load_head
from xfer.io import write_json
from xfer.layout import Layout


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
            head, head_spec = load_head(layout.head_dir)
            backbone, prep, _ = create_backbone(params.backbone, num_classes=0)
            model = Classifier(backbone, head)
            manifest = read_manifest(layout.manifest)

            def data(role: str, split: str) -> ImageRows:
                part = rows(manifest, role, split)
                return ImageRows(part.path.tolist(), part.label.tolist(), prep, layout.root)

            model, history = run_finetune(
                model,
                data("source", "train"),
                data("source", "val"),
                cfg,
                device,
                params.seed,
                monitor={"target_val": data("target", "val")},
                on_epoch=run.epoch_logger("finetune"),
            )
            spec = ClassifierSpec(
                backbone=params.backbone.name,
                head=head_spec["head"],
                feature_dim=head_spec["in_dim"],
                num_classes=head_spec["num_classes"],
                class_names=head_spec["class_names"],
                preprocessing=prep.as_dict(),
            )
            save_classifier(layout.finetune_dir, model, spec)
            best = max(history, key=lambda r: r["val_accuracy"])
            summary = {
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
