"""The whole chain as one Prefect flow, on tiny params, against real MLflow."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks import tracking
from tasks.tracking import loggable_params
from xfer.config import load_params
from xfer.contract import STAGE_NAMES as STAGES
from xfer.contract import stage_params
from xfer.finetune import load_classifier
from xfer.layout import Layout


def test_every_stage_writes_its_files(pipeline_project):
    root, result = pipeline_project
    layout = Layout(root)
    for path in [
        layout.manifest,
        layout.features_current / "meta.json",
        layout.head_dir / "head.pt",
        layout.finetune_dir / "model.pt",
        layout.metrics("head"),
        layout.metrics("finetune"),
    ]:
        assert path.is_file(), path
    assert sorted(p.name for p in (layout.raw / "digits").iterdir()) == ["dataset.json", "handwritten", "images.csv", "printed", "validation.json"]
    assert layout.split_report.is_file()
    ev = json.loads(layout.metrics("eval").read_text())
    assert set(ev) == {"head", "finetune", "fusion"}
    for model in ("head", "finetune", "fusion"):
        for split in ("source_test", "target_test"):
            m = ev[model][split]
            assert 0 <= m["accuracy"] <= 1 and set(m) >= {"macro_precision", "macro_recall", "macro_f1"}
        assert result["evaluate"][model]["target_test"] == ev[model]["target_test"]["accuracy"]
    assert len(list(layout.stage_plots("evaluate").glob("confusion_*.png"))) == 9  # head, finetune, fusion x 3 splits
    assert len(list(layout.stage_plots("evaluate").glob("per_class_accuracy_*.png"))) == 3
    assert (layout.stage_plots("head") / "tsne.png").is_file()
    head = json.loads(layout.metrics("head").read_text())
    assert head["method"] == "self_training" and head["uses_target_labels"] is False  # the default recipe
    assert 0 <= head["proxy_a_distance"]["backbone"] <= 2
    per_class = ev["head"]["target_test"]["per_class_accuracy"]
    assert len(per_class) == 10 and np.isclose(np.mean(list(per_class.values())), ev["head"]["target_test"]["macro_recall"])


def test_target_test_never_trains_a_model(pipeline_project):
    root, _ = pipeline_project
    import pandas as pd

    m = pd.read_csv(Layout(root).manifest)
    # 12 per class, 25% test: 3 per class held out in each domain.
    assert (m[(m.role == "target") & (m.split == "test")].groupby("label").size() == 3).all()
    head_spec = json.loads((Layout(root).head_dir / "head.json").read_text())
    assert head_spec["features_key"] == json.loads((Layout(root).features_current / "meta.json").read_text())["key"]


def test_mlflow_holds_grouped_stage_runs(pipeline_project):
    root, result = pipeline_project
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    exp = client.get_experiment_by_name("xfer")
    parent_id = result["mlflow_pipeline_run"]
    parent = client.get_run(parent_id)
    assert parent.data.params["head.epochs"] == "4" and parent.data.tags["xfer.kind"] == "pipeline"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_stage = {r.data.tags["xfer.stage"]: r for r in children}
    assert sorted(by_stage) == sorted(STAGES)
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED"
        assert len(run.data.tags["git_commit"]) > 0
        assert "time.work_s" in run.data.metrics
    manifest_digest = by_stage["split"].data.tags["data_digest"]
    assert by_stage["evaluate"].data.tags["data_digest"] == manifest_digest
    assert by_stage["head"].data.params["head.lr"] == "0.01"
    # Each stage logs exactly the params its dvc.yaml entry names (xfer/contract.py), no more.
    params = load_params(root / "params.yaml")
    for stage, run in by_stage.items():
        assert set(run.data.params) == set(loggable_params(stage_params(params, stage))), stage
    assert "data.split.target_test" not in by_stage["fetch"].data.params and "data.digits.seed" in by_stage["fetch"].data.params
    assert by_stage["finetune"].data.params["backbone.name"] == "test_efficientnet"
    # One value per epoch, not only the last.
    history = client.get_metric_history(by_stage["head"].info.run_id, "head.source_val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]
    ft_history = client.get_metric_history(by_stage["finetune"].info.run_id, "finetune.source_val_accuracy")
    assert [m.step for m in ft_history] == [0, 1]
    # Every epoch's label-free scores, beside its accuracies.
    assert [m.step for m in client.get_metric_history(by_stage["finetune"].info.run_id, "finetune.validator_info_max")] == [0, 1]
    artifacts = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)}
    assert {"eval.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "plots")}
    assert "plots/confusion_finetune_target_test.png" in plots
    head_plots = {a.path for a in client.list_artifacts(by_stage["head"].info.run_id, "plots")}
    assert head_plots == {"plots/tsne.png", "plots/learning_curves.png"}
    assert by_stage["evaluate"].data.metrics["finetune.target_test.accuracy"] == result["evaluate"]["finetune"]["target_test"]


def test_logged_model_predicts_like_the_saved_one(pipeline_project):
    root, _ = pipeline_project
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    exp = client.get_experiment_by_name("xfer")
    run = client.search_runs([exp.experiment_id], "tags.`xfer.stage` = 'finetune'")[0]
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    model = next(m for m in models if m.source_run_id == run.info.run_id)
    signature = mlflow.models.get_model_info(model.model_uri).signature
    assert tuple(signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 32, 32)
    logged = mlflow.pytorch.load_model(model.model_uri)
    saved, spec = load_classifier(Layout(root).finetune_dir)
    x = torch.randn(2, 3, spec.preprocessing["image_size"], spec.preprocessing["image_size"])
    with torch.no_grad():
        np.testing.assert_allclose(logged(x).numpy(), saved(x).numpy(), atol=1e-5)


def test_finetune_scores_every_epoch_with_the_validators_on_its_seeded_target_rows(pipeline_project):
    """The kept (last) epoch's scores, in finetune.json and the learning curve, are the validators'
    scores of the saved model on the stage's sample of target rows, computed again here."""
    import csv

    from xfer import features as feats
    from xfer.data.split import read_manifest
    from xfer.finetune import predict_logits
    from xfer.finetune_job import epoch_judge
    from xfer.heads import EPOCH_VALIDATORS
    from xfer.metrics import softmax

    root, _ = pipeline_project
    layout = Layout(root)
    params = load_params(root / "params.yaml")
    summary = json.loads(layout.metrics("finetune").read_text())
    assert summary["selection"] == "last" and set(summary["validators"]) == set(EPOCH_VALIDATORS)
    with open(layout.stage_plots("finetune") / "learning_curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in curve] == [0, 1] and all(r["validator_info_max"] != "" for r in curve)
    assert float(curve[-1]["validator_dev"]) == summary["validators"]["dev"]

    model, spec = load_classifier(layout.finetune_dir)
    fs = feats.load_current(layout.features_current)
    manifest = read_manifest(layout.manifest)
    judge = epoch_judge(manifest, fs, spec.prep(), root, params.finetune, torch.device("cpu"), len(spec.class_names), params.seed)
    from xfer.data.images import ImageRows
    from xfer.data.split import rows

    val = rows(manifest, "source", "val")
    logits, _ = predict_logits(model, ImageRows(val.path.tolist(), val.label.tolist(), spec.prep(), root), 32, torch.device("cpu"))
    again = judge(model, softmax(logits))
    for name in EPOCH_VALIDATORS:
        assert again[f"validator_{name}"] == pytest.approx(summary["validators"][name], rel=1e-4, abs=1e-6), name


def test_importance_weighting_and_fda_in_the_head_and_finetune_stages(pipeline_project, tmp_path, tiny_params):
    """head.importance_weighting and finetune.importance_weighting through the stage flows: the same
    weights (same cached features and seed) summarised in both stages' metrics, the head's figure in MLflow;
    fine-tuning with finetune.augment.fda on as well (its images: tests/test_augment.py)."""
    import shutil

    from helpers import write_params

    from flows.stages import STAGE_FLOWS

    source, _ = pipeline_project
    root = tmp_path / "project"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "models", "metrics"))
    tiny_params["head"].update(method="source_only", importance_weighting=True, importance_max_weight=5.0)
    tiny_params["finetune"].update(method="source_only", importance_weighting=True, importance_max_weight=5.0, augment={"fda": 0.05})
    write_params(root, tiny_params)
    STAGE_FLOWS["head"](root=str(root))
    STAGE_FLOWS["finetune"](root=str(root))
    head = json.loads((root / "metrics/head.json").read_text())["importance_weights"]
    tuned = json.loads((root / "metrics/finetune.json").read_text())["importance_weights"]
    manifest = pd.read_csv(Layout(root).manifest)
    assert head["rows"] == ((manifest.role == "source") & (manifest.split == "train")).sum()
    assert head == tuned and 1 <= head["effective_sample_size"] <= head["rows"] and head["max_weight"] <= 5.0
    assert (root / "plots/head/importance_weights.png").stat().st_size > 0
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("xfer").experiment_id], "tags.`xfer.stage` = 'head'")[0]
    assert "plots/importance_weights.png" in [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
