"""The evaluate stage's work: every model (and their fusion) on source test, target val and target test.

`evaluate_models` scores the head on its cached features, the fine-tuned
network on the images themselves, each fusion member's head on its own
features, and the fusion (the mean of every model's class probabilities);
it writes `eval.json`, the figures and the ROC curves, and returns what it scored. Tracking
and the registry stay in tasks/evaluate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xfer import features as feats
from xfer.config import PROMOTION_VALIDATORS, HeadConfig, Params, member_name
from xfer.cross_validation import cross_validate_head
from xfer.data.images import ImageRows
from xfer.data.split import read_manifest, rows
from xfer.finetune import load_classifier, predict_logits, select_device
from xfer.finetune_cv import cross_validate_finetune
from xfer.finetune_job import resolve_method
from xfer.heads import FEATURE_FUSION, MEMBERS_DIR, HeadNet, load_head
from xfer.io import write_json
from xfer.metrics import (
    CROSS_VALIDATION,
    CROSS_VALIDATION_FINETUNE,
    classification_metrics,
    confusion_matrix,
    fuse_probabilities,
    one_vs_rest_roc_auc,
    per_class_accuracy,
    reliability_from_probabilities,
    roc_curve,
    softmax,
)
from xfer.plots import per_class_accuracy_figure, prediction_rows, reliability_figure, roc_figure, save_confusion_matrix, save_figure, write_rows_csv
from xfer.validators import Evidence, Outputs, panel

# (manifest role, split) -> the name used in eval.json and plot files.
# target_val is what the registry's promotion rule compares (tasks/registry.py).
EVAL_SETS = {("source", "test"): "source_test", ("target", "val"): "target_val", ("target", "test"): "target_test"}
# The label-free figures (the validators) are scored on the target val images, whose labels
# they never read, and stored beside that split's metrics: eval.json <model>.target_val.validators.
LABEL_FREE_ROWS = ("target", "val")
LABEL_FREE_SET = EVAL_SETS[LABEL_FREE_ROWS]
# The split whose ROC curves are drawn (every split gets its AUCs in eval.json).
ROC_SET = "target_test"


@dataclass(frozen=True)
class Evaluation:
    results: dict[str, dict]  # model -> split -> metrics, and the head's cross_validation when evaluate.cv_folds is set (eval.json)
    plots: list[Path]
    features: feats.FeatureSet  # the main backbone's, which the registered head reads
    head_selection: dict | None = None  # how the head stage chose the head (its spec's `selection`)
    # model -> split -> rows where the model's output (logits or probabilities) holds a NaN or an infinity;
    # the registry never registers a model with any on target val (tasks/registry.py).
    non_finite: dict[str, dict[str, int]] | None = None


def non_finite_rows(*outputs: np.ndarray) -> int:
    """Rows where any of `outputs` (each rows x classes) holds a NaN or an infinity."""
    bad = np.zeros(len(outputs[0]), dtype=bool)
    for out in outputs:
        bad |= ~np.isfinite(out).all(axis=1)
    return int(bad.sum())


def fusion_members(member_features_dir: Path, head_dir: Path, params: Params) -> dict[str, tuple[HeadNet, feats.FeatureSet]]:
    """{member name: (its head, its cached features)} for each of params `fusion.backbones` with a head of its own."""
    members = {}
    for backbone in params.fusion.probability_members:
        name = member_name(backbone)
        head, spec = load_head(head_dir / MEMBERS_DIR / name)
        fs = feats.load_member(member_features_dir, name)
        if spec["features_key"] != fs.meta["key"]:
            raise RuntimeError(f"the head of {name} was trained on other features than the cached ones; rerun the head stage")
        members[name] = (head, fs)
    return members


def feature_fusion_head(main: feats.FeatureSet, member_features_dir: Path, head_dir: Path, params: Params) -> tuple[HeadNet, feats.FeatureSet] | None:
    """fusion.mode features: the head on every backbone's features side by side, and those features."""
    if params.fusion.mode != "features":
        return None
    head, spec = load_head(head_dir / FEATURE_FUSION)
    fs = feats.load_fused(main, member_features_dir, [member_name(b) for b in params.fusion.backbones])
    if spec["features_key"] != fs.meta["key"]:
        raise RuntimeError(f"the {FEATURE_FUSION} head was trained on other features than the cached ones; rerun the head stage")
    return head, fs


def head_probabilities(head: HeadNet, x: np.ndarray, role: str) -> np.ndarray:
    with torch.no_grad():
        # A head with domain_norm standardises each domain with that domain's statistics.
        return torch.softmax(head(torch.as_tensor(x), role), 1).numpy()


def evaluate_models(
    *,
    manifest_path: Path,
    images_root: Path,
    features_dir: Path,
    member_features_dir: Path,
    head_dir: Path,
    finetune_dir: Path,
    metrics_path: Path,
    plot_dir: Path,
    roc_dir: Path,
    params: Params,
    head_pick: Path | None = None,
    cv_work_dir: Path | None = None,
) -> Evaluation:
    """`features_dir`: the main backbone's published features; `member_features_dir`: the fusion members'.

    `roc_dir` gets each model's ROC curve on target test as a CSV (classes pooled one
    against the rest: `dvc plots show` draws it); `plot_dir` every figure. With
    finetune.cv, the fine-tuning recipe (its method auto resolved from `head_pick`)
    is cross-validated in temporary projects under `cv_work_dir`.
    """
    manifest = read_manifest(manifest_path)
    fs = feats.load_current(features_dir)
    head, head_spec = load_head(head_dir)
    names = head_spec["class_names"]
    if params.evaluate.cv_folds:
        # First: a bad fold count is refused before any scoring (and the folds take seconds).
        cross_validation = cross_validate_head(fs, HeadConfig(**head_spec["head"]), len(names), params.evaluate.cv_folds, params.seed)
    # finetune.cv's recipe, resolved first: a missing head pick is refused before any scoring.
    cv_recipe = resolve_method(params.finetune, head_pick) if params.finetune.cv else None
    classifier, spec = load_classifier(finetune_dir)
    device = select_device("auto")
    members = fusion_members(member_features_dir, head_dir, params)
    fused_features = feature_fusion_head(fs, member_features_dir, head_dir, params)
    results: dict[str, dict] = {"head": {}, "finetune": {}, "fusion": {}, **{name: {} for name in members}}
    if fused_features is not None:
        results[FEATURE_FUSION] = {}
    plots: list[Path] = []
    non_finite: dict[str, dict[str, int]] = {model_name: {} for model_name in results}

    def probabilities_on(role: str, split: str, set_name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every model's class probabilities on one split (the fusion last), and its labels."""
        x, y = fs.select(role, split)
        part = rows(manifest, role, split)
        data = ImageRows(part.path.tolist(), part.label.tolist(), spec.prep(), images_root)
        logits, labels = predict_logits(classifier, data, params.evaluate.batch_size, device, progress=True, desc=f"evaluate {set_name}")
        if not np.array_equal(labels, y):
            raise RuntimeError(f"{set_name}: cached features and manifest rows are out of order; rerun the features stage")
        # Kept whole, not just their argmax: calibration needs each row's confidence.
        probabilities = {"head": head_probabilities(head, x, role), "finetune": softmax(logits)}
        for name, (member_head, member_fs) in members.items():
            xm, ym = member_fs.select(role, split)
            if not np.array_equal(ym, y):
                raise RuntimeError(f"{set_name}: the features of {name} are not in manifest order; rerun the features stage")
            probabilities[name] = head_probabilities(member_head, xm, role)
        # Fusion: the mean of every model's class probabilities.
        probabilities["fusion"] = fuse_probabilities(list(probabilities.values()))
        if fused_features is not None:  # a row of its own, not a share of the fusion above
            fused_head, fused_fs = fused_features
            probabilities[FEATURE_FUSION] = head_probabilities(fused_head, fused_fs.select(role, split)[0], role)
        for model_name, p in probabilities.items():
            non_finite.setdefault(model_name, {})[set_name] = non_finite_rows(p, logits) if model_name == "finetune" else non_finite_rows(p)
        return probabilities, y

    target_val: dict[str, np.ndarray] = {}
    for (role, split), set_name in EVAL_SETS.items():
        probabilities, y = probabilities_on(role, split, set_name)
        if set_name == LABEL_FREE_SET:
            target_val = probabilities
        predictions = {model_name: p.argmax(1) for model_name, p in probabilities.items()}
        per_class = {}
        for model_name, pred in predictions.items():
            scored = results[model_name][set_name] = classification_metrics(y, pred, len(names))
            cm = confusion_matrix(y, pred, len(names))
            per_class[model_name] = per_class_accuracy(cm)
            scored["per_class_accuracy"] = dict(zip(names, per_class[model_name].round(6).tolist()))
            path = plot_dir / f"confusion_{model_name}_{set_name}.png"
            save_confusion_matrix(path, cm, names, f"{model_name} on {set_name} (accuracy {scored['accuracy']:.3f})")
            plots.append(path)
            auc, auc_per_class = one_vs_rest_roc_auc(y, probabilities[model_name])
            scored["roc_auc"] = auc
            scored["per_class_roc_auc"] = dict(zip(names, auc_per_class))
            reliability = reliability_from_probabilities(probabilities[model_name], y)
            scored["ece"] = reliability.ece
            path = plot_dir / f"reliability_{model_name}_{set_name}.png"
            plots.append(save_figure(path, reliability_figure(reliability, f"{model_name} on {set_name}")))
            # What `dvc plots show` draws as a confusion matrix (dvc.yaml `plots:`).
            write_rows_csv(plot_dir / f"predictions_{model_name}_{set_name}.csv", prediction_rows(y, probabilities[model_name], names))
        path = plot_dir / f"per_class_accuracy_{set_name}.png"
        plots.append(save_figure(path, per_class_accuracy_figure(per_class, names, f"per-class accuracy on {set_name}")))
        if set_name == ROC_SET:
            plots += roc_plots(probabilities, y, {m: results[m][set_name]["roc_auc"] for m in probabilities}, names, set_name, plot_dir, roc_dir)
    source_val, source_val_labels = probabilities_on("source", "val", "source_val (for the validators)")
    evidence = Evidence(
        source_val_labels=source_val_labels,
        source_val_features=fs.select("source", "val")[0],
        target_features=fs.select(*LABEL_FREE_ROWS)[0],
        source_train_features=fs.select("source", "train")[0],
        num_classes=len(names),
        seed=params.seed,
    )
    for model_name, scores in label_free_scores(target_val, source_val, evidence).items():
        results[model_name][LABEL_FREE_SET]["validators"] = scores
    if params.evaluate.cv_folds:
        results[CROSS_VALIDATION] = cross_validation
    if cv_recipe is not None:
        results[CROSS_VALIDATION_FINETUNE] = cross_validate_finetune(
            manifest=manifest, fs=fs, params=params.model_copy(update={"finetune": cv_recipe}), images_root=images_root, work_dir=cv_work_dir
        )
    write_json(metrics_path, results)
    return Evaluation(results, plots, fs, head_spec.get("selection"), {m: c for m, c in non_finite.items() if m in results})


def roc_plots(
    probabilities: dict[str, np.ndarray], labels: np.ndarray, aucs: dict[str, float | None], names: list[str], set_name: str, plot_dir: Path, roc_dir: Path
) -> list[Path]:
    """Each model's ROC curves on one split: a figure of every class's curve (one panel per model) and,
    per model, a CSV of its curve with the classes pooled (every row's probability of each class
    against whether that is its class: the micro average), which `dvc plots show` draws."""
    curves = {m: [roc_curve(p[:, c], labels == c) for c in range(len(names))] for m, p in probabilities.items()}
    paths = [save_figure(plot_dir / f"roc_{set_name}.png", roc_figure(curves, aucs, names, f"ROC, one class against the rest, on {set_name}"))]
    for model_name, p in probabilities.items():
        fpr, tpr = roc_curve(p, np.eye(len(names), dtype=bool)[labels])
        paths.append(write_rows_csv(roc_dir / f"roc_{model_name}_{set_name}.csv", [{"fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)]))
    return paths


def label_free_scores(target: dict[str, np.ndarray], source_val: dict[str, np.ndarray], evidence: Evidence) -> dict[str, dict[str, float]]:
    """model -> validator -> its score: each model's figures without a target label.

    `target` holds each model's probabilities on the target val images (their labels
    unread), `source_val` on source val. The validators' scores are per model, so
    a later run's figure compares with this one's (registry.metric may name one).
    """
    # A model with a NaN or infinite output has no score (NaN): the validators' linear algebra would fail on it.
    models = [m for m in target if np.isfinite(target[m]).all() and np.isfinite(source_val[m]).all()]
    candidates = [Outputs(target=target[m], source_val=source_val[m]) for m in models]
    scores = panel(candidates, evidence, PROMOTION_VALIDATORS) if candidates else {}
    scored = {m: {name: float(values[i]) for name, values in scores.items()} for i, m in enumerate(models)}
    return {m: scored.get(m, dict.fromkeys(PROMOTION_VALIDATORS, float("nan"))) for m in target}
