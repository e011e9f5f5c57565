"""evaluate stage: every model (and their fusion) on source test, target val and target test."""

from __future__ import annotations

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.registry import register_and_promote
from tasks.report import publish_report
from tasks.tracking import stage_run
from xfer import features as feats
from xfer.config import Params, member_name
from xfer.data.images import ImageRows
from xfer.data.split import read_manifest, rows
from xfer.finetune import load_classifier, predict_logits, select_device
from xfer.heads import MEMBERS_DIR, HeadNet, load_head
from xfer.io import write_json
from xfer.layout import Layout
from xfer.metrics import classification_metrics, confusion_matrix, fuse_probabilities, per_class_accuracy, reliability_from_probabilities, softmax
from xfer.plots import per_class_accuracy_figure, prediction_rows, reliability_figure, save_confusion_matrix, save_figure, write_rows_csv

# (manifest role, split) -> the name used in eval.json and plot files.
# target_val is what the registry's promotion rule compares (tasks/registry.py).
EVAL_SETS = {("source", "test"): "source_test", ("target", "val"): "target_val", ("target", "test"): "target_test"}


def fusion_members(layout: Layout, params: Params) -> dict[str, tuple[HeadNet, feats.FeatureSet]]:
    """{member name: (its head, its cached features)} for each of params `fusion.backbones`."""
    members = {}
    for backbone in params.fusion.backbones:
        name = member_name(backbone)
        head, spec = load_head(layout.head_dir / MEMBERS_DIR / name)
        fs = feats.load_member(layout.features_members, name)
        if spec["features_key"] != fs.meta["key"]:
            raise RuntimeError(f"the head of {name} was trained on other features than the cached ones; rerun the head stage")
        members[name] = (head, fs)
    return members


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(layout: Layout, params: Params) -> dict:
    with stage_run("evaluate", layout, params, ["evaluate"]) as run:
        with run.work():
            manifest = read_manifest(layout.manifest)
            fs = feats.load_current(layout.features_current)
            head, head_spec = load_head(layout.head_dir)
            classifier, spec = load_classifier(layout.finetune_dir)
            device = select_device("auto")
            names = head_spec["class_names"]
            members = fusion_members(layout, params)
            results: dict[str, dict] = {"head": {}, "finetune": {}, "fusion": {}, **{name: {} for name in members}}
            plots = []
            plot_dir = layout.stage_plots("evaluate")
            for (role, split), set_name in EVAL_SETS.items():
                x, y = fs.select(role, split)
                with torch.no_grad():
                    # A head with domain_norm standardises each domain with that domain's statistics.
                    head_probs = torch.softmax(head(torch.as_tensor(x), role), 1).numpy()
                part = rows(manifest, role, split)
                data = ImageRows(part.path.tolist(), part.label.tolist(), spec.prep(), layout.root)
                logits, labels = predict_logits(classifier, data, params.evaluate.batch_size, device, progress=True, desc=f"evaluate {set_name}")
                if not np.array_equal(labels, y):
                    raise RuntimeError(f"{set_name}: cached features and manifest rows are out of order; rerun the features stage")
                # Kept whole, not just their argmax: calibration needs each row's confidence.
                probabilities = {"head": head_probs, "finetune": softmax(logits)}
                for name, (member_head, member_fs) in members.items():
                    xm, ym = member_fs.select(role, split)
                    if not np.array_equal(ym, y):
                        raise RuntimeError(f"{set_name}: the features of {name} are not in manifest order; rerun the features stage")
                    with torch.no_grad():
                        probabilities[name] = torch.softmax(member_head(torch.as_tensor(xm), role), 1).numpy()
                # Fusion: the mean of every model's class probabilities.
                probabilities["fusion"] = fuse_probabilities(list(probabilities.values()))
                predictions = {model_name: p.argmax(1) for model_name, p in probabilities.items()}
                predictions["finetune"] = logits.argmax(1)
                per_class = {}
                for model_name, pred in predictions.items():
                    results[model_name][set_name] = classification_metrics(y, pred, len(names))
                    cm = confusion_matrix(y, pred, len(names))
                    per_class[model_name] = per_class_accuracy(cm)
                    results[model_name][set_name]["per_class_accuracy"] = dict(zip(names, per_class[model_name].round(6).tolist()))
                    path = plot_dir / f"confusion_{model_name}_{set_name}.png"
                    acc = results[model_name][set_name]["accuracy"]
                    save_confusion_matrix(path, cm, names, f"{model_name} on {set_name} (accuracy {acc:.3f})")
                    plots.append(path)
                    reliability = reliability_from_probabilities(probabilities[model_name], y)
                    results[model_name][set_name]["ece"] = reliability.ece
                    path = plot_dir / f"reliability_{model_name}_{set_name}.png"
                    plots.append(save_figure(path, reliability_figure(reliability, f"{model_name} on {set_name}")))
                    # What `dvc plots show` draws as a confusion matrix (dvc.yaml `plots:`).
                    write_rows_csv(plot_dir / f"predictions_{model_name}_{set_name}.csv", prediction_rows(y, probabilities[model_name], names))
                path = plot_dir / f"per_class_accuracy_{set_name}.png"
                plots.append(save_figure(path, per_class_accuracy_figure(per_class, names, f"per-class accuracy on {set_name}")))
            write_json(layout.metrics("eval"), results)
        run.log_metrics(results)
        run.log_artifact(layout.metrics("eval"))
        for path in plots:
            run.log_artifact(path, "plots")
        promotion = register_and_promote(layout, params, results, fs) if params.registry.enabled else None
        publish_report(results, promotion, run)
    return {m: {s: r["accuracy"] for s, r in v.items()} for m, v in results.items()}
