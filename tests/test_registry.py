"""The model registry, the served model and `xfer predict`, against real MLflow stores."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_PARAMS, write_params
from PIL import Image

from tasks.registry import CHALLENGER, CHAMPION, decide


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) else value
    return out


def client_for(root: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return MlflowClient()


def holder_of(client, alias: str) -> str:
    return str(client.get_model_version_by_alias("xfer", alias).version)


def test_promotion_rule_needs_a_strictly_better_challenger():
    assert decide(0.5, None)[0]
    assert decide(0.51, 0.5)[0]
    assert not decide(0.5, 0.5)[0], "a tie must keep the champion"
    assert not decide(0.4, 0.5)[0]


# Chance-level heads and fine-tuning; and a run with 5 labelled target images per class.
WORSE = {"head": {"epochs": 1, "lr": 1e-5}, "finetune": {"lr": 1e-7, "probe_epochs": 1, "probe_lr": 1e-5}}
BETTER = {"data": {"split": {"target_shots": 5}}, "head": {"epochs": 20}}


@pytest.mark.slow
def test_champion_moves_only_to_a_better_run(tmp_path, prefect_api):
    from flows.pipeline import pipeline

    figures = []
    for overrides in ({}, WORSE, BETTER):
        write_params(tmp_path, merged(TINY_PARAMS, overrides))
        pipeline(root=str(tmp_path))
        figures.append(json.loads((tmp_path / "metrics/eval.json").read_text())["fusion"]["target_val"]["accuracy"])
        client = client_for(tmp_path)
        if len(figures) == 2:
            after_worse = holder_of(client, CHAMPION), holder_of(client, CHALLENGER)
    # The scenario the rule is tested on: second worse than first, third better than the first.
    assert figures[1] < figures[0] < figures[2], figures
    assert after_worse == ("1", "2"), "a worse second run must leave @champion on the first"
    assert holder_of(client, CHAMPION) == "3", "a better third run takes @champion"

    versions = {str(v.version): client.get_model_version("xfer", v.version) for v in client.search_model_versions("name = 'xfer'")}
    assert [float(versions[v].tags["target_val.accuracy"]) for v in ("1", "2", "3")] == pytest.approx(figures)
    assert versions["2"].tags["promotion"] == CHALLENGER and versions["3"].tags["promotion"] == CHAMPION
    # The decision and both figures are on the third evaluate run.
    run = client.get_run(versions["3"].tags["run_id"])
    assert run.data.tags["promotion.decision"] == "promoted"
    assert run.data.metrics["promotion.challenger"] == pytest.approx(figures[2])
    assert run.data.metrics["promotion.champion"] == pytest.approx(figures[0])
    second = client.get_run(versions["2"].tags["run_id"])
    assert second.data.tags["promotion.decision"] == "kept champion"
    assert second.data.metrics["promotion.champion"] == pytest.approx(figures[0])


def target_test_folder(root: Path, dest: Path) -> Path:
    """The manifest's target test images copied to <dest>/<class name>/<file>."""
    manifest = pd.read_csv(root / "data/splits/manifest.csv", dtype={"class_name": str})
    rows = manifest[(manifest.role == "target") & (manifest.split == "test")]
    for row in rows.itertuples():
        (dest / row.class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / row.path, dest / row.class_name / Path(row.path).name)
    return dest


def xfer_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_xfer_predict_reproduces_the_evaluated_accuracy(pipeline_project, tmp_path):
    root, _ = pipeline_project
    folder = target_test_folder(root, tmp_path / "target_test")
    out = tmp_path / "predictions.csv"
    proc = xfer_cli("predict", str(folder), "--out", str(out), "--root", str(root), cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    predictions = pd.read_csv(out, dtype={"class": str})
    truth = predictions.path.map(lambda p: Path(p).parent.name)
    evaluated = json.loads((root / "metrics/eval.json").read_text())[TINY_PARAMS["registry"]["model"]]["target_test"]
    assert len(predictions) == evaluated["n"]
    assert (predictions["class"] == truth).mean() == pytest.approx(evaluated["accuracy"], abs=1e-9)
    classes = [c for c in predictions.columns if c not in {"path", "class", "probability", "ood_score", "out_of_distribution"}]
    np.testing.assert_allclose(predictions[classes].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predictions[classes].max(1), predictions.probability, atol=1e-6)


def test_served_model_takes_paths_and_its_unwrapped_model_arrays_alike(pipeline_project):
    import mlflow
    from mlflow.exceptions import MlflowException

    root, _ = pipeline_project
    client_for(root)
    model = mlflow.pyfunc.load_model("models:/xfer@champion")
    manifest = pd.read_csv(root / "data/splits/manifest.csv")
    paths = [str(root / p) for p in manifest.path[:5]]
    by_path = model.predict(pd.DataFrame({"image": paths}))
    # The signature's one unnamed column: a plain list of paths is the same input.
    pd.testing.assert_frame_equal(model.predict(paths), by_path)
    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    # Arrays are not what the signature names: MLflow refuses them before the model runs ...
    with pytest.raises(MlflowException, match="schema"):
        model.predict(np.stack(arrays))
    # ... and the model itself, unwrapped, takes them.
    unwrapped = model.unwrap_python_model()
    by_array = unwrapped.predict(None, np.stack(arrays))
    assert list(by_path["class"]) == list(by_array["class"])
    np.testing.assert_allclose(by_path["probability"], by_array["probability"], atol=1e-6)
    # Float arrays in 0..1 are the same pixels.
    by_float = unwrapped.predict(None, [a.astype(np.float32) / 255 for a in arrays])
    np.testing.assert_allclose(by_path["probability"], by_float["probability"], atol=1e-5)


def test_xfer_predict_refuses_missing_paths_and_corrupt_images_and_writes_nothing(pipeline_project, tmp_path):
    root, _ = pipeline_project
    out = tmp_path / "predictions.csv"
    proc = xfer_cli("predict", str(tmp_path / "nope"), "--out", str(out), "--root", str(root), cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and "nope: no such file or folder" in proc.stderr
    proc = xfer_cli("predict", str(root / "data/raw"), "--model", "models:/xfer@nobody", "--out", str(out), "--root", str(root), cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and "cannot load model models:/xfer@nobody" in proc.stderr
    folder = target_test_folder(root, tmp_path / "images")
    broken = next(folder.rglob("*.png"))
    broken.write_bytes(b"not a png")
    proc = xfer_cli("predict", str(folder), "--out", str(out), "--root", str(root), cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and f"cannot read image {broken}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_evaluate_publishes_a_prefect_report_with_metrics_and_decision(pipeline_project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.report import REPORT_KEY

    root, _ = pipeline_project
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_KEY])))
    assert artifacts, "no evaluation report artifact"
    evaluated = json.loads((root / "metrics/eval.json").read_text())
    reports = [a.data for a in artifacts]
    row = f"| fusion | target_test | {evaluated['fusion']['target_test']['accuracy']:.3f} |"
    report = next((r for r in reports if row in r), None)
    assert report is not None, f"no report holds {row!r}"
    assert "promoted to @champion" in report or "kept the champion" in report
    assert "#/experiments/" in report and "/runs/" in report


def test_evaluate_scores_every_model_without_target_labels_on_the_target_val_images(pipeline_project):
    import torch

    from xfer import features as feats
    from xfer.config import PROMOTION_VALIDATORS
    from xfer.heads import load_head
    from xfer.layout import Layout
    from xfer.validators import Evidence, Outputs, score

    root, _ = pipeline_project
    evaluated = json.loads((root / "metrics/eval.json").read_text())
    for model, by_split in evaluated.items():
        assert set(by_split["target_val"]["validators"]) == set(PROMOTION_VALIDATORS), model
    # The head's scores again, from its own probabilities on the cached target val rows.
    layout = Layout(root)
    head, _ = load_head(layout.head_dir)
    fs = feats.load_current(layout.features_current)
    with torch.no_grad():
        target = torch.softmax(head(torch.as_tensor(fs.select("target", "val")[0]), "target"), 1).numpy()
    x_val, y_val = fs.select("source", "val")
    evidence = Evidence(source_val_labels=y_val, source_val_features=x_val, target_features=fs.select("target", "val")[0], num_classes=target.shape[1])
    outputs = [Outputs(target=target, source_val=np.zeros((len(y_val), target.shape[1])))]
    for name in ("entropy", "info_max", "bnm"):
        assert evaluated["head"]["target_val"]["validators"][name] == pytest.approx(score(name, outputs, evidence)[0], rel=1e-5), name


def test_a_validator_decides_promotion_and_the_run_says_no_target_label_was_read(pipeline_project, tmp_path):
    import mlflow

    from tasks.registry import BY_VALIDATOR, register_and_promote
    from tasks.report import markdown_report
    from xfer import features as feats
    from xfer.config import load_params
    from xfer.layout import Layout

    root, _ = pipeline_project
    layout = Layout(root)
    params = load_params(root / "params.yaml")
    params = params.model_copy(update={"registry": params.registry.model_copy(update={"metric": "info_max"})})
    features = feats.load_current(layout.features_current)
    evaluated = json.loads((root / "metrics/eval.json").read_text())
    model = params.registry.model
    score = evaluated[model]["target_val"]["validators"]["info_max"]

    def with_figures(info_max: float, accuracy: float) -> dict:
        out = copy.deepcopy(evaluated)
        out[model]["target_val"].update(accuracy=accuracy)
        out[model]["target_val"]["validators"]["info_max"] = info_max
        return out

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        decisions = []
        # First version; then lower info_max with perfect target val accuracy (labels would promote it); then higher info_max.
        for results in (evaluated, with_figures(score - 0.1, 1.0), with_figures(score + 0.1, 0.0)):
            with mlflow.start_run() as run:
                decisions.append((register_and_promote(layout, params, results, features), run.info.run_id))
        client = mlflow.tracking.MlflowClient()
        assert [d.promoted for d, _ in decisions] == [True, False, True]
        assert [d.challenger for d, _ in decisions] == pytest.approx([score, score - 0.1, score + 0.1])
        assert decisions[1][0].champion == pytest.approx(score)
        for decision, run_id in decisions:
            assert decision.metric == "target_val.validators.info_max" and decision.kind == BY_VALIDATOR
            tags = client.get_run(run_id).data.tags
            assert tags["promotion.kind"] == BY_VALIDATOR and tags["promotion.metric"] == decision.metric
        version = client.get_model_version(params.registry.name, decisions[2][0].version)
        assert float(version.tags["target_val.validators.info_max"]) == pytest.approx(score + 0.1)
        report = markdown_report(evaluated, decisions[1][0], "0", decisions[1][1], None)
        assert f"- decided by: {BY_VALIDATOR}" in report and "## Without target labels" in report
    finally:
        mlflow.set_tracking_uri(previous)
