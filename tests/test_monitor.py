"""`xfer monitor` against the model the tiny pipeline registered: no drift in its own target test
images, drift in inverted copies of them; bad input refused before anything is written."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from test_registry import target_test_folder, xfer_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def monitored(pipeline_project, tmp_path_factory):
    """(a project reading the pipeline's registered model from a copy of its store, the target test
    images, inverted copies of them, a scratch folder)."""
    root, _ = pipeline_project
    work = tmp_path_factory.mktemp("monitor")
    project = work / "project"
    project.mkdir()
    for name in ("params.yaml", "mlflow.db"):
        shutil.copy(root / name, project / name)
    images = target_test_folder(root, work / "target_test")
    inverted = work / "inverted"
    for path in sorted(images.rglob("*.png")):
        dest = inverted / path.relative_to(images)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            ImageOps.invert(img.convert("RGB")).save(dest)
    return project, images, inverted, work


def monitor(*args: str) -> tuple[int, str]:
    proc = xfer_cli("monitor", *args, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_target_test_images_show_no_drift_and_inverted_copies_do(monitored):
    project, images, inverted, work = monitored
    out = work / "out"
    code, output = monitor(str(images), "--root", str(project), "--out", str(out))
    assert code == 0, output
    same = json.loads((out / "report.json").read_text())
    assert not same["drift"] and not same["retrain_wanted"], same
    assert same["images"] == len(list(images.rglob("*.png"))) and same["reference_rows"] >= 5
    assert set(same["tests"]) == {"mmd", "domain_classifier", "class_ks"}
    assert all(t["p_value"] >= same["alpha_per_test"] for t in same["tests"].values())
    assert "target val" in same["accuracy"]["method"] and 0 <= same["accuracy"]["estimate"] <= 1
    assert "no drift in" in output

    # The same images inverted, listed in a CSV (paths relative to it) rather than a folder.
    listing = work / "inverted.csv"
    pd.DataFrame({"path": [p.relative_to(work).as_posix() for p in sorted(inverted.rglob("*.png"))]}).to_csv(listing, index=False)
    code, output = monitor(str(listing), "--root", str(project), "--out", str(out))
    assert code == 0, output
    shifted = json.loads((out / "report.json").read_text())
    assert shifted["drift"] and "DRIFT in" in output, shifted
    assert min(t["p_value"] for t in shifted["tests"].values()) < shifted["alpha_per_test"]

    # The per-image flag: inverted images are flagged far more often than the target domain's own.
    assert same["ood"]["expected_share"] == pytest.approx(0.05) and shifted["ood"]["share"] > same["ood"]["share"], (same["ood"], shifted["ood"])

    history = pd.read_csv(out / "history.csv")
    assert history.drift.tolist() == [False, True] and len(history) == 2
    for plot in ("projection.png", "history.png"):
        with Image.open(out / plot) as img:
            assert img.format == "PNG" and img.size[0] > 300
    with sqlite3.connect(project / "mlflow.db") as db:
        runs = db.execute("select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid where t.key = 'xfer.kind' and t.value = 'monitor'").fetchall()
        drift_tags = sorted(v for (v,) in db.execute("select value from tags where key = 'monitor.drift'"))
        p_values = db.execute("select count(*) from latest_metrics where key = 'mmd.p_value'").fetchone()[0]
    assert len(runs) == 2 and drift_tags == ["false", "true"] and p_values == 2


def test_xfer_predict_gives_each_image_an_ood_score_and_flag(monitored):
    """The CSV's last two columns: the score (distance from the reference window) and the flag
    (above the threshold in the model's reference window); inverted images score higher."""
    project, images, inverted, work = monitored
    frames = {}
    for name, folder in (("same", images), ("inverted", inverted)):
        proc = xfer_cli("predict", str(folder), "--out", str(work / f"{name}.csv"), "--root", str(project), cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        frames[name] = pd.read_csv(work / f"{name}.csv")
    same, shifted = frames["same"], frames["inverted"]
    assert list(same.columns[-2:]) == ["ood_score", "out_of_distribution"] and same.out_of_distribution.dtype == bool
    assert shifted.ood_score.median() > same.ood_score.median()
    assert shifted.out_of_distribution.mean() > same.out_of_distribution.mean()
    both = pd.concat([same, shifted])  # one threshold: every flagged image scores above every unflagged one
    assert both.ood_score[both.out_of_distribution].min() > both.ood_score[~both.out_of_distribution].max()


def test_bad_input_and_a_model_without_a_reference_window_are_refused_writing_nothing(monitored, tmp_path, monkeypatch):
    import mlflow

    project, images, _, work = monitored
    out = tmp_path / "out"
    code, output = monitor(str(tmp_path / "nope"), "--root", str(project), "--out", str(out))
    assert code == 2 and "nope: no such file or folder" in output
    (tmp_path / "empty").mkdir()
    code, output = monitor(str(tmp_path / "empty"), "--root", str(project), "--out", str(out))
    assert code == 2 and "no images" in output
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(images.rglob("*.png"))[:3]:
        shutil.copy(path, few / path.name)
    code, output = monitor(str(few), "--root", str(project), "--out", str(out))
    assert code == 2 and "at least 5" in output and "nothing written" in output, output
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    bad = sorted(broken.rglob("*.png"))[0]
    bad.write_bytes(b"not a png")
    code, output = monitor(str(broken), "--root", str(project), "--out", str(out))
    assert code == 2 and f"cannot read image {bad}" in output and "Traceback" not in output, output

    # The registered model, downloaded, without its reference window (as one registered before xfer saved it).
    store = f"sqlite:///{project / 'mlflow.db'}"
    # MLflow finds a models:/ name through its process-wide registry URI whatever registry_uri says
    # (models_artifact_repo.py): without this, the store an earlier test in this process named.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store)
    model = Path(
        mlflow.artifacts.download_artifacts(artifact_uri="models:/xfer@champion", dst_path=str(tmp_path / "model"), tracking_uri=store, registry_uri=store)
    )
    reference = model / "artifacts" / "bundle" / "reference"
    meta = json.loads((reference / "meta.json").read_text())
    assert meta["accuracy_estimate"]["uses_target_labels"] and meta["accuracy_estimate"]["calibrated_on"] == "target val"
    shutil.rmtree(reference)
    code, output = monitor(str(images), "--model", str(model), "--root", str(project), "--out", str(out))
    assert code == 2 and "has no reference window" in output and "evaluate" in output, output
    assert not out.exists()


def test_a_champion_without_a_reference_window_is_pointed_to_the_latest_version(monitored, tmp_path):
    """A champion registered before reference windows existed stays @champion when a new version ties it:
    the error names the latest version, which has one, in the store named, whatever MLflow's
    process-wide URI says (before: it asked that URI, and an earlier test's store gave no hint)."""
    import mlflow

    from cli.monitor import newer_version_hint
    from xfer.monitor import MonitorError

    project = monitored[0]
    store = f"sqlite:///{project / 'mlflow.db'}"
    missing = MonitorError("the model has no reference window (...)")
    with sqlite3.connect(project / "mlflow.db") as db:
        latest = db.execute("select max(version) from model_versions where name = 'xfer'").fetchone()[0]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'another.db'}")  # a store without the model
    try:
        hint = newer_version_hint("models:/xfer@champion", missing, store)
    finally:
        mlflow.set_tracking_uri(previous)
    assert hint == f" (or, if a tie kept an older champion, name a newer version: --model models:/xfer/{latest})"
    assert newer_version_hint("/some/model/folder", missing, store) == ""
    assert newer_version_hint("models:/xfer@champion", MonitorError("other"), store) == ""


def test_the_benchmarks_shifts_are_what_they_say():
    """benchmarks/drift.py's generated shifts: none leaves the pixels, inverted is 255 - x, noisy and
    rotated change them (seeded: the same twice), and an unknown name is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_drift", REPO / "benchmarks" / "drift.py")
    drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drift)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    pixels = np.asarray(image, dtype=np.int64)
    assert (np.asarray(drift.shifted(image, "none", np.random.default_rng(0))) == pixels).all()
    assert (np.asarray(drift.shifted(image, "inverted", np.random.default_rng(0))) == 255 - pixels).all()
    noisy = [np.asarray(drift.shifted(image, "noisy", np.random.default_rng(1)), dtype=np.int64) for _ in range(2)]
    assert (noisy[0] == noisy[1]).all() and 5 < np.abs(noisy[0] - pixels).mean() < 3 * drift.NOISE_SD
    assert (np.asarray(drift.shifted(image, "rotated", np.random.default_rng(0))) != pixels).mean() > 0.5
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        drift.shifted(image, "blur", np.random.default_rng(0))
