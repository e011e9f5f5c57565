"""Reports: reliability diagrams with ECE, learning curves, and the CSVs `dvc plots show` draws."""

import csv
import json

import numpy as np
import pytest
from helpers import TINY_PARAMS
from mlflow.tracking import MlflowClient
from sklearn import metrics as skm

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


def test_the_report_table_shows_roc_auc_and_n_a_where_it_is_undefined():
    from tasks.report import metrics_table

    figures = {"accuracy": 0.875, "macro_precision": 0.5, "macro_recall": 0.25, "macro_f1": 0.125, "roc_auc": 0.75}
    header, _, defined, undefined = metrics_table({"head": {"target_test": figures, "target_val": figures | {"roc_auc": None}}})
    assert header.endswith("| macro_f1 | roc_auc |")
    assert defined == "| head | target_test | 0.875 | 0.500 | 0.250 | 0.125 | 0.750 |"
    assert undefined.endswith("| 0.125 | n/a |")


def test_the_report_shows_the_cross_validation_apart_from_the_models():
    from tasks.report import markdown_report

    figures = {"accuracy": 0.875, "macro_precision": 0.5, "macro_recall": 0.25, "macro_f1": 0.125, "roc_auc": 0.75}
    summary = {m: {"mean": 0.5, "std": 0.25} for m in figures} | {"roc_auc": {"mean": None, "std": None}}
    cv = {
        "folds": 5,
        "rows": 100,
        "fold_sizes": [20] * 5,
        "recipe": {"method": "mcc", "selection": "soft_info_max"},
        "held_out": summary,
        "target_test": summary,
    }
    page = markdown_report({"head": {"target_test": figures}, "cross_validation": cv}, None, "1", "abc", None)
    models = page.split("## Cross-validation")[0]
    assert "| head | target_test |" in models and "cross_validation" not in models  # not a model row
    section = page.split("## Cross-validation")[1]
    assert "(mcc, epoch by soft_info_max) trained once per fold: 5 stratified folds of the 100 labelled training rows" in section
    assert "| held_out | 0.500 ± 0.250 | 0.500 ± 0.250 | 0.500 ± 0.250 | 0.500 ± 0.250 | n/a |" in section


def test_roc_figure_draws_a_panel_per_model_and_skips_an_absent_class(tmp_path):
    from xfer.metrics import roc_curve
    from xfer.plots import roc_figure

    y = np.array([0, 0, 1, 1])  # class 2 absent: no curve
    p = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    curves = {m: [roc_curve(p[:, c], y == c) for c in range(3)] for m in ("head", "finetune")}
    fig = roc_figure(curves, {"head": 1.0, "finetune": None}, ["a", "b", "c"], "toy")
    assert [ax.get_title() for ax in fig.axes] == ["head\nmacro AUC 1.000", "finetune\nmacro AUC n/a"]
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]  # classes a and b, and the diagonal
    assert save_figure(tmp_path / "roc.png", fig).read_bytes().startswith(PNG_MAGIC)


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


def test_eval_roc_auc_is_scikit_learns_on_the_heads_own_probabilities(pipeline_project):
    """eval.json's head AUCs and its ROC curve CSV, recomputed from the saved head on the cached
    features; every model has an AUC per split and a curve on target test, and the figure exists."""
    from xfer import features as feats
    from xfer.evaluate import head_probabilities
    from xfer.heads import load_head

    root, _ = pipeline_project
    layout = Layout(root)
    ev = json.loads(layout.metrics("eval").read_text())
    head, spec = load_head(layout.head_dir)
    x, y = feats.load_current(layout.features_current).select("target", "test")
    p = head_probabilities(head, x, "target")
    names = spec["class_names"]
    scored = ev["head"]["target_test"]
    for c, name in enumerate(names):
        assert scored["per_class_roc_auc"][name] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]), abs=1e-9)
    assert scored["roc_auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in range(len(names))]), abs=1e-9)
    curve = read_csv(layout.roc_plots / "roc_head_target_test.csv")
    fpr, tpr, _ = skm.roc_curve(np.eye(len(names), dtype=bool)[y].ravel(), p.ravel(), drop_intermediate=False)
    np.testing.assert_allclose([float(r["fpr"]) for r in curve], fpr, atol=1e-12)
    np.testing.assert_allclose([float(r["tpr"]) for r in curve], tpr, atol=1e-12)
    for model in MODELS:
        for split, figures in ev[model].items():
            assert 0 <= figures["roc_auc"] <= 1 and set(figures["per_class_roc_auc"]) == set(names), (model, split)
        assert (layout.roc_plots / f"roc_{model}_target_test.csv").is_file()
    assert (layout.stage_plots("evaluate") / "roc_target_test.png").read_bytes().startswith(PNG_MAGIC)


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
    # So are the ROC AUCs, and the ROC figure and curves are artifacts beside the other plots.
    assert metrics["head.target_test.roc_auc"] == pytest.approx(ev["head"]["target_test"]["roc_auc"])
    assert {"plots/roc_target_test.png", *(f"plots/roc_{m}_target_test.csv" for m in MODELS)} <= plots("evaluate")
