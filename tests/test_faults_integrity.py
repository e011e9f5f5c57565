"""Issue 17, integrity: damaged feature cache entries, MLflow stores and checkpoints, against real stage processes.

A project is run once through fetch, split, features and head (tiny params);
each test damages a copy of it on disk (truncated, bytes flipped in place,
emptied) and reruns the real stages as `python -m flows.stages` processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from xfer import features as feats
from xfer.checkpoints import CHECKPOINT_FILE, PREVIOUS_FILE, load_checkpoint, save_checkpoint
from xfer.layout import Layout


def run_stage(stage: str, root: Path, prefect_api: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("XFER_PIPELINE_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "flows.stages", stage, "--root", str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory, prefect_api) -> Path:
    """A tiny project after fetch, split, features and head."""
    from helpers import TINY_PARAMS, write_params

    root = tmp_path_factory.mktemp("integrity-base")
    write_params(root, TINY_PARAMS)
    for stage in ("fetch", "split", "features", "head"):
        ok(run_stage(stage, root, prefect_api))
    return root


@pytest.fixture
def copy(base, tmp_path) -> Path:
    """A copy of the base project; `cp -a` keeps the hard links between the cache entry and the features output."""
    dest = tmp_path / "project"
    subprocess.run(["cp", "-a", str(base), str(dest)], check=True)
    return dest


def runs_in(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]


def revision(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


# --- feature cache ------------------------------------------------------------------


def _damage_truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _damage_flip(path: Path) -> None:
    """Same size, same inode: a few bytes of the data changed in place."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 64)
        block = bytearray(f.read(8))
        f.seek(path.stat().st_size - 64)
        f.write(bytes(b ^ 0x5A for b in block))


def _damage_flip_middle(path: Path) -> None:
    """Same size: one byte in the middle of the file (a checkpoint's tensor data) changed in place."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(path.stat().st_size // 2)
        f.write(bytes([byte ^ 0x5A]))


def _damage_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("name", "damage", "run_head"),
    [("features.npy", _damage_truncate, False), ("features.npy", _damage_flip, True), ("index.csv", _damage_empty, False)],
    ids=["truncated-features", "flipped-features", "empty-index"],
)
def test_a_damaged_feature_entry_is_refused_by_its_readers_and_recomputed_by_features(copy, base, prefect_api, name, damage, run_head):
    """Truncated, flipped in place (same size) or emptied: the readers (head, finetune, evaluate) stop naming
    the file and the way out, never train on it and never give a raw pandas/numpy error; the features stage
    recomputes the entry with a warning naming it (never a hit) and publishes exactly the undamaged bytes,
    which is what `dvc repro -s features` then hashes into dvc.lock."""
    layout = Layout(copy)
    current = layout.features_current
    entry = next(p for p in layout.feature_cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert os.path.samefile(current / name, entry / name)  # published as a hard link: damage hits both
    good = {f: sha(current / f) for f in ("features.npy", "index.csv", "meta.json")}
    damage(current / name)

    with pytest.raises(feats.FeatureCacheError, match=f"{current} are damaged or incomplete: {name} has sha256 .* run the features stage again"):
        feats.load_current(current)  # what head, finetune and evaluate call
    if run_head:
        head = run_stage("head", copy, prefect_api)
        assert head.returncode != 0 and f"{current} are damaged" in head.stdout + head.stderr
        assert sha(layout.metrics("head")) == sha(base / "metrics" / "head.json")  # the head output is untouched

    out = ok(run_stage("features", copy, prefect_api))
    assert f"the cache entry {entry} is damaged ({name} has sha256" in out
    assert "cache hit" not in out
    assert {f: sha(current / f) for f in good} == good
    assert {f: sha(entry / f) for f in good} == good
    if run_head:  # and the head trained on them is the original one
        ok(run_stage("head", copy, prefect_api))
        assert layout.metrics("head").read_text() == (base / "metrics" / "head.json").read_text()


# --- MLflow store ---------------------------------------------------------------------


def test_an_empty_mlflow_store_stops_the_stage_and_is_never_recreated(copy, prefect_api):
    """A zero-length mlflow.db was silently re-created (every run and the registry gone); now the stage
    stops before any work, naming the file and what to do, and leaves it as it was."""
    db = Layout(copy).mlflow_db
    db.write_bytes(b"")
    before = sha(Layout(copy).metrics("head"))
    proc = run_stage("head", copy, prefect_api)
    assert proc.returncode == 2
    assert f"the MLflow store {db} is empty (0 bytes)" in proc.stderr and "restore it from a backup" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert db.stat().st_size == 0
    assert sha(Layout(copy).metrics("head")) == before


def test_a_truncated_mlflow_store_stops_the_stage_with_a_clear_message(copy, prefect_api):
    """Half-truncated: a raw sqlite3.DatabaseError traceback before; now one line naming the file."""
    db = Layout(copy).mlflow_db
    os.truncate(db, db.stat().st_size // 2)
    damaged = sha(db)
    proc = run_stage("fetch", copy, prefect_api)
    assert proc.returncode == 2
    assert f"the MLflow store {db} is damaged" in proc.stderr and "move it away" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sha(db) == damaged


def test_an_older_schema_store_is_copied_before_it_is_migrated(copy, caplog):
    """A store of an older MLflow schema (MLflow refused to open it: "out-of-date database schema") is backed
    up whole, then migrated, and keeps every run; through use_store, what every stage calls first."""
    import mlflow
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    from tasks.tracking import use_store

    db = Layout(copy).mlflow_db
    command.downgrade(_get_alembic_config(f"sqlite:///{db}"), "-1")
    old, runs = revision(db), runs_in(db)
    assert old != _get_latest_schema_revision()

    try:
        with caplog.at_level(logging.WARNING, logger="tasks.tracking"):
            experiment = use_store(Layout(copy), "xfer")
        mlflow.MlflowClient().create_run(experiment)
    finally:
        mlflow.set_tracking_uri(None)
    backup = db.with_name(f"mlflow.db.schema-{old}.bak")
    assert f"the store as it was is kept in {backup}" in caplog.text
    assert revision(backup) == old and runs_in(backup) == runs
    assert revision(db) == _get_latest_schema_revision()
    assert runs_in(db) == runs + 1  # every old run, and the one just made


# --- checkpoints ----------------------------------------------------------------------


def test_a_truncated_finetune_checkpoint_is_set_aside_and_training_starts_over(copy, prefect_api):
    """A truncated last.pt failed every rerun (PytorchStreamReader ...); now it is renamed, not deleted,
    finetune says so and trains from scratch."""
    folder = Layout(copy).checkpoints / "finetune"
    save_checkpoint(folder, {"key": "a run", "epoch": 1, "w": torch.zeros(10_000)})
    last = folder / CHECKPOINT_FILE
    _damage_truncate(last)
    truncated = sha(last)

    out = ok(run_stage("finetune", copy, prefect_api))
    assert f"checkpoint {last} is damaged" in out and "set aside as last.pt.damaged" in out
    assert "training from scratch" in out
    assert sha(folder / "last.pt.damaged") == truncated
    assert not last.exists() and (Layout(copy).finetune_dir / "model.pt").is_file()


def _state(epoch: int) -> dict:
    return {"key": "run", "epoch": epoch, "w": torch.full((1000,), float(epoch))}


def test_a_checkpoint_flipped_in_place_is_caught_and_the_previous_one_resumed(tmp_path, caplog):
    """torch.load reads a checkpoint with flipped data bytes without complaint; its digest does not match."""
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    last = tmp_path / CHECKPOINT_FILE
    _damage_flip_middle(last)
    torch.load(last, weights_only=True)  # still "loads": torch checks no digest
    with caplog.at_level(logging.WARNING, logger="xfer.checkpoints"):
        state = load_checkpoint(tmp_path, "run")
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert "is damaged" in caplog.text and "resuming from" in caplog.text and PREVIOUS_FILE in caplog.text
    assert (tmp_path / "last.pt.damaged").is_file() and not last.exists()


def test_with_every_checkpoint_damaged_training_starts_over_and_nothing_is_deleted(tmp_path, caplog):
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    _damage_truncate(tmp_path / CHECKPOINT_FILE)
    _damage_flip(tmp_path / PREVIOUS_FILE)
    (tmp_path / "last.pt.damaged").write_bytes(b"an earlier one")
    with caplog.at_level(logging.WARNING, logger="xfer.checkpoints"):
        assert load_checkpoint(tmp_path, "run") is None
    assert "training from scratch" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt.damaged", "last.pt.damaged-2", "previous.pt.damaged"]
    assert (tmp_path / "last.pt.damaged").read_bytes() == b"an earlier one"
