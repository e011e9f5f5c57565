"""Reports: reliability diagrams with ECE, learning curves, and the CSVs `dvc plots show` draws."""

import csv
import json

import numpy as np
import pytest
from helpers import TINY_PARAMS
from mlflow.tracking import MlflowClient

from xfer.layout import Layout
from xfer.metrics import reliability_bins
from xfer.plots import learning_curve_rows, prediction_rows, reliability_figure, save_figure, write_rows_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ("head", "finetune", "fusion")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_learning_curve_rows_number_epochs_and_leave_missing_values_blank(tmp_path):
    # Fine-tuning's history: epoch 0 is evaluated before any step, so it has no train loss.
    history = [{"val_accuracy": 0.5}, {"val_accuracy": 0.75, "train_loss": 1.25}]
    rows = learning_curve_rows(history, first_epoch=0)
    assert [r["epoch"] for r in rows] == [0, 1]
    path = write_rows_csv(tmp_path / "curve.csv", rows)
    assert path.read_text() == "epoch,val_accuracy,train_loss\n0,0.5,\n1,0.75,1.25\n"
    assert [tmp.name for tmp in tmp_path.iterdir()] == ["curve.csv"]  # no temporary file left beside it


def test_prediction_rows_name_classes_and_keep_full_confidence():
    probabilities = np.array([[0.1, 0.9], [0.6, 0.4]])
    rows = prediction_rows(np.array([1, 1]), probabilities, ["cat", "dog"])
    assert rows == [
        {"actual": "dog", "predicted": "dog", "confidence": 0.9},
        {"actual": "dog", "predicted": "cat", "confidence": 0.6},
    ]


def test_reliability_figure_draws_with_empty_bins(tmp_path):
    bins = reliability_bins(np.array([0.95, 0.96, 0.3]), np.array([1, 0, 1]))
    fig = reliability_figure(bins, "toy")
    assert f"ECE {bins.ece:.3f}" in fig.axes[0].get_title()
    # One bar per filled bin (accuracy), one per filled bin (gap): 2 filled bins of 15.
    assert len(fig.axes[0].patches) == 4
    path = save_figure(tmp_path / "r.png", fig)
    assert path.read_bytes().startswith(PNG_MAGIC)


# ---- what a tiny pipeline run (flows.pipeline) wrote ----


def test_reliability_diagrams_for_every_model_and_split(pipeline_project):
    root, _ = pipeline_project
    layout = Layout(root)
    ev = json.loads(layout.metrics("eval").read_text())
    for model in MODELS:
        for split in ev[model]:
            path = layout.stage_plots("evaluate") / f"reliability_{model}_{split}.png"
            assert path.read_bytes().startswith(PNG_MAGIC), path


def test_eval_ece_is_what_the_predictions_give(pipeline_project):
    """Each eval.json ece, recomputed from the per-row predictions evaluate wrote."""
    root, _ = pipeline_project
    layout = Layout(root)
    ev = json.loads(layout.metrics("eval").read_text())
    for model in MODELS:
        assert "target_test" in ev[model]
        for split, scores in ev[model].items():
            rows = read_csv(layout.stage_plots("evaluate") / f"predictions_{model}_{split}.csv")
            assert len(rows) == scores["n"]
            correct = np.array([r["actual"] == r["predicted"] for r in rows])
            confidence = np.array([float(r["confidence"]) for r in rows])
            assert correct.mean() == pytest.approx(scores["accuracy"])
            assert scores["ece"] == pytest.approx(reliability_bins(confidence, correct).ece, abs=1e-12)
            assert 0 < scores["ece"] < 1
            # A confidence is a top class probability: at least 1/classes.
            assert confidence.min() >= 1 / len(scores["per_class_accuracy"]) - 1e-6


def test_learning_curves_have_one_row_per_epoch(pipeline_project):
    root, _ = pipeline_project
    layout = Layout(root)
    head_rows = read_csv(layout.stage_plots("head") / "learning_curve.csv")
    assert [int(r["epoch"]) for r in head_rows] == list(range(1, TINY_PARAMS["head"]["epochs"] + 1))
    head = json.loads(layout.metrics("head").read_text())
    kept = head_rows[head["best_epoch"] - 1]
    assert float(kept["source_val_accuracy"]) == pytest.approx(head["source_val_accuracy"])
    assert float(kept["target_val_accuracy"]) == pytest.approx(head["target_val_accuracy"])
    assert all(float(r["train_loss"]) > 0 for r in head_rows)

    # Fine-tuning: epoch 0 (before any step, no train loss), then one row per epoch.
    ft_rows = read_csv(layout.stage_plots("finetune") / "learning_curve.csv")
    assert [int(r["epoch"]) for r in ft_rows] == list(range(0, TINY_PARAMS["finetune"]["epochs"] + 1))
    assert ft_rows[0]["train_loss"] == "" and all(float(r["train_loss"]) > 0 for r in ft_rows[1:])
    finetune = json.loads(layout.metrics("finetune").read_text())
    assert float(ft_rows[finetune["best_epoch"]]["source_val_accuracy"]) == pytest.approx(finetune["source_val_accuracy"])
    for stage in ("head", "finetune"):
        assert (layout.stage_plots(stage) / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_reports_are_mlflow_artifacts_of_their_stage_runs(pipeline_project):
    import mlflow

    from tasks import tracking

    root, _ = pipeline_project
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    exp = client.get_experiment_by_name("xfer")
    runs = client.search_runs([exp.experiment_id], "tags.`xfer.kind` = 'stage'")
    by_stage = {r.data.tags["xfer.stage"]: r for r in runs}

    def plots(stage):
        return {a.path for a in client.list_artifacts(by_stage[stage].info.run_id, "plots")}

    assert "plots/learning_curves.png" in plots("head")
    assert "plots/learning_curves.png" in plots("finetune")
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert {f"plots/reliability_{m}_{s}.png" for m in MODELS for s in ev[m]} <= plots("evaluate")
    # The ECE is a metric of the evaluate run, as the accuracies are.
    metrics = by_stage["evaluate"].data.metrics
    assert metrics["fusion.target_test.ece"] == pytest.approx(ev["fusion"]["target_test"]["ece"])
