"""The model registry: evaluate registers what it scored; @champion moves only for a better model.

Every registered version carries its target val figures as tags
(`target_val.accuracy`, ...). A new version (the challenger) takes the
`@champion` alias only if its `registry.metric` is strictly higher than the
champion's; otherwise it gets `@challenger`. Ties keep the champion. That
metric is either a classification metric on target val (`target_val.<metric>`,
it reads target labels) or a validator's label-free score
(`target_val.validators.<name>`, no target label read): the decision says
which kind decided. The decision, with both figures, is logged to the
evaluate run (tags, metrics and `promotion.json`) and to the version's tags.
The rule, and how two evaluate runs at once take turns: tasks/promotion.py.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

import xfer
from tasks.promotion import BY_TARGET_LABELS, BY_VALIDATOR, CHALLENGER, CHAMPION, Promotion, champion_figure, decide, promote  # noqa: F401  (this module's API too)
from xfer.backbones import create_backbone
from xfer.config import PROMOTION_VALIDATORS, BackboneConfig, Params, member_name
from xfer.data.split import read_manifest
from xfer.features import FeatureSet, load_member
from xfer.heads import MEMBERS_DIR, load_head
from xfer.layout import Layout
from xfer.monitor import OOD_FLAG_COLUMN, OOD_SCORE_COLUMN, write_reference
from xfer.predictor import CLASS_COLUMN, DEFAULT_BATCH_SIZE, PROBABILITY_COLUMN, FinetunePart, HeadPart, bundle_class_names, load_bundle, write_bundle

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
XFER_PACKAGE = Path(xfer.__file__).parent
# What xfer.predictor imports, pinned to this environment; explicit, as MLflow's
# import-scanning inference takes seconds.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "pydantic", "PyYAML", "tqdm")
EVAL_SPLIT = "target_val"


def head_part(head_dir: Path, backbone: BackboneConfig, features: FeatureSet) -> HeadPart:
    """A head with the frozen backbone whose cached features it was trained on, checked against the cache."""
    model, prep, weights = create_backbone(backbone)
    _, head_spec = load_head(head_dir)
    if weights.digest != features.meta.get("weights_digest") or head_spec["features_key"] != features.meta.get("key"):
        raise RuntimeError(f"{head_dir}, the feature cache and the params of {backbone.name} disagree: rerun the features and head stages")
    return HeadPart(head_dir, model.eval(), backbone.name, prep)


def servable_parts(layout: Layout, params: Params, features: FeatureSet) -> list[HeadPart | FinetunePart]:
    """What registry.model is made of: the head, the fine-tuned network, or all of them and the fusion heads."""
    kind = params.registry.model
    parts: list[HeadPart | FinetunePart] = []
    if kind in ("head", "fusion"):
        parts.append(head_part(layout.head_dir, params.backbone, features))
    if kind in ("finetune", "fusion"):
        parts.append(FinetunePart(layout.finetune_dir))
    if kind == "fusion":
        for backbone in params.fusion.probability_members:
            name = member_name(backbone)
            parts.append(head_part(layout.head_dir / MEMBERS_DIR / name, backbone, load_member(layout.features_members, name)))
    return parts


def served_signature(class_names: list[str]) -> ModelSignature:
    """What the served model takes and returns, as MLflow enforces and shows it.

    In: one column of image file paths, readable where the model runs: a list
    of paths, or a DataFrame whose one column (`image`, say) holds them. The
    column is unnamed so that both reach the model; MLflow refuses anything
    else, arrays included, before the model sees it.
    Out: the predicted class, its probability, one probability column per class, and each
    image's OOD score and flag (the model carries its reference window: xfer/monitor.py).
    Params: `batch_size`, images per forward pass.
    """
    outputs = [ColSpec(DataType.string, CLASS_COLUMN), ColSpec(DataType.float, PROBABILITY_COLUMN)]
    outputs += [ColSpec(DataType.float, name) for name in class_names]
    outputs += [ColSpec(DataType.double, OOD_SCORE_COLUMN), ColSpec(DataType.boolean, OOD_FLAG_COLUMN)]
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("batch_size", DataType.long, DEFAULT_BATCH_SIZE)]),
    )


def log_servable_model(layout: Layout, params: Params, features: FeatureSet) -> mlflow.models.model.ModelInfo:
    """The registry.model as an MLflow pyfunc model in the active run: image paths in, probabilities out,
    with its reference window for drift monitoring (xfer/monitor.py)."""
    parts = servable_parts(layout, params, features)
    with tempfile.TemporaryDirectory(prefix="xfer-bundle-") as tmp:
        bundle = write_bundle(Path(tmp) / "bundle", params.registry.model, parts)
        # What `xfer monitor` compares new images with: the model's view of its target domain.
        write_reference(bundle, load_bundle(bundle), layout.root, read_manifest(layout.manifest), params.monitor, params.seed)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(XFER_PACKAGE)],
            pip_requirements=[f"{p}=={installed_version(p)}" for p in SERVING_PACKAGES],
            signature=served_signature(bundle_class_names(bundle)),
        )


def version_tags(figures: dict) -> dict[str, str]:
    """A registered version's target val figures as tags: its metrics and its validators' scores."""
    tags = {f"{EVAL_SPLIT}.{k}": str(v) for k, v in figures.items() if isinstance(v, (int, float))}
    tags.update({f"{EVAL_SPLIT}.validators.{k}": str(v) for k, v in figures.get("validators", {}).items()})
    return tags


def promotion_figure(figures: dict, metric: str) -> tuple[str, float, str]:
    """(tag key, value, kind) of registry.metric among the registered model's target val figures."""
    if metric in PROMOTION_VALIDATORS:
        return f"{EVAL_SPLIT}.validators.{metric}", float(figures["validators"][metric]), BY_VALIDATOR
    return f"{EVAL_SPLIT}.{metric}", float(figures[metric]), BY_TARGET_LABELS


class ModelRefused(RuntimeError):
    """The evaluated model is not fit to register (a NaN or infinite output on target val)."""


def refusal(model: str, non_finite: dict[str, dict[str, int]], rows: int) -> str | None:
    """Why registry.model `model` must not be registered, or None: a non-finite output on any target val row.

    `non_finite`: model -> split -> rows with a NaN or infinite output (xfer.evaluate.Evaluation);
    `rows`: how many target val rows there are. Names every part with such rows.
    """
    bad = {name: counts.get(EVAL_SPLIT, 0) for name, counts in non_finite.items() if counts.get(EVAL_SPLIT, 0)}
    if not bad.get(model):
        return None
    parts = ", ".join(f"{name} {n} of {rows}" for name, n in sorted(bad.items()))
    return (
        f"registry.model {model!r} gives a NaN or infinite output on {bad[model]} of {rows} {EVAL_SPLIT} rows "
        f"({parts}): not registered, and @champion is unchanged; retrain the model(s) named, whose weights hold NaN or infinite values"
    )


def log_refusal(model: str, reason: str) -> None:
    """The refusal on the evaluate run, where a promotion decision would be."""
    mlflow.set_tags({"promotion.decision": "refused", "promotion.reason": reason, "promotion.model": model})
    mlflow.log_dict({"decision": "refused", "model": model, "reason": reason}, "promotion.json")


def register_and_promote(layout: Layout, params: Params, results: dict, features: FeatureSet) -> Promotion:
    """Register the evaluated model as a new version and apply the promotion rule."""
    cfg = params.registry
    figures = results[cfg.model][EVAL_SPLIT]
    metric, challenger, kind = promotion_figure(figures, cfg.metric)
    info = log_servable_model(layout, params, features)
    tags = version_tags(figures)
    tags.update({"model": cfg.model, "run_id": mlflow.active_run().info.run_id})
    decision = promote(cfg.name, info.model_uri, metric, challenger, kind, tags)
    log_decision(decision)
    return decision


def log_decision(decision: Promotion) -> None:
    mlflow.set_tags(
        {
            "promotion.decision": "promoted" if decision.promoted else "kept champion",
            "promotion.version": decision.version,
            "promotion.reason": decision.reason,
            "promotion.metric": decision.metric,
            "promotion.kind": decision.kind,
        }
    )
    figures = {"promotion.challenger": decision.challenger}
    if decision.champion is not None:
        figures["promotion.champion"] = decision.champion
    mlflow.log_metrics(figures)
    mlflow.log_dict(decision.as_dict(), "promotion.json")
