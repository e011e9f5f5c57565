"""Faults: no silent bad models, the fine-tuning checkpoint outlives the model write, a full disk is named.

Issue 17's NaN, checkpoint-order and disk-full items, against real stages:
- a loss that diverges to NaN or inf (valid but reckless params) stops the
  head and fine-tuning with the step, the epoch and the loss named, and no model;
- a model whose output on target val holds NaN is never registered;
- a finetune stage process killed right after models/finetune/model.pt is
  written resumes at its last epoch on the rerun instead of training again;
- a features stage under a real file-size limit stops with the path, the bytes
  needed and the bytes free, keeps its finished shard, and the rerun without
  the limit computes only the missing one.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_PARAMS, write_params

from xfer.layout import Layout

# Valid params (lr <= 10, weight_decay <= 1) whose weights grow ~9x per step until the logits overflow.
DIVERGING_FINETUNE = {"lr": 10.0, "weight_decay": 1.0}
DIVERGING_HEAD = {
    "kind": "linear",
    "method": "source_only",
    "feature_norm": "none",
    "optimizer": "adamw",
    "lr_schedule": "constant",
    "lr": 10.0,
    "weight_decay": 1.0,
    "epochs": 30,
}


def _params(**sections) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    for name, values in sections.items():
        params[name].update(values)
    return params


def _copy(src: Path, dest: Path, params: dict | None = None, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*without) if without else None)
    if params is not None:
        write_params(dest, params)
    return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory, prefect_api) -> Path:
    """Tiny digits fetched, split, featurised and a head trained, once; each test copies it."""
    from flows.stages import STAGE_FLOWS

    root = tmp_path_factory.mktemp("base")
    write_params(root, TINY_PARAMS)
    for stage in ("fetch", "split", "features", "head"):
        STAGE_FLOWS[stage](root=str(root))
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base) -> Path:
    """`base` fine-tuned: what evaluate reads."""
    from flows.stages import STAGE_FLOWS

    root = _copy(base, tmp_path_factory.mktemp("finished") / "p")
    STAGE_FLOWS["finetune"](root=str(root))
    return root


def stage_env(prefect_api: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("XFER_PIPELINE_RUN_ID", None)
    return env


# --- NaN: training stops, with the step and the loss -------------------------------------------


def test_a_diverging_head_stops_with_the_step_epoch_and_loss_and_writes_no_head(tmp_path, base):
    from flows.stages import STAGE_FLOWS
    from xfer.heads import NonFiniteLossError

    root = _copy(base, tmp_path / "p", _params(head=DIVERGING_HEAD), without=("models", "metrics", "plots"))
    with pytest.raises(NonFiniteLossError, match=r"head training \(method source_only\), step \d+ of 60, epoch \d+ of 30: the loss is (nan|inf)") as err:
        STAGE_FLOWS["head"](root=str(root))
    assert "head.lr (now 10.0)" in str(err.value)
    assert not (root / "models").exists() and not Layout(root).metrics("head").exists()


def test_a_diverging_finetune_stops_with_the_step_epoch_and_loss_and_writes_no_model(tmp_path, base):
    from flows.stages import STAGE_FLOWS
    from xfer.heads import NonFiniteLossError

    root = _copy(base, tmp_path / "p", _params(finetune=DIVERGING_FINETUNE))
    with pytest.raises(NonFiniteLossError, match=r"fine-tuning \(lp_ft, method self_training\), step \d of 3, epoch 1 of 1: the loss is (nan|inf)") as err:
        STAGE_FLOWS["finetune"](root=str(root))
    assert "finetune.lr (now 10.0)" in str(err.value)
    layout = Layout(root)
    # Before: exit 0 and a model.pt with 49 of 90 tensors NaN.
    assert not (layout.finetune_dir / "model.pt").exists() and not layout.metrics("finetune").exists()


# --- A model with a non-finite output is never registered ----------------------------------------


def test_evaluate_refuses_to_register_a_model_with_nan_outputs_and_says_why(tmp_path, finished):
    from mlflow.tracking import MlflowClient

    from flows.stages import STAGE_FLOWS
    from tasks.registry import ModelRefused
    from tasks.tracking import tracking_uri

    root = _copy(finished, tmp_path / "p")
    layout = Layout(root)
    weights = layout.finetune_dir / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["head.classifier.bias"] = torch.full_like(state["head.classifier.bias"], float("nan"))
    torch.save(state, weights)

    with pytest.raises(ModelRefused, match=r"registry.model 'fusion' gives a NaN or infinite output on 30 of 30 target_val rows") as err:
        STAGE_FLOWS["evaluate"](root=str(root))
    assert "finetune 30 of 30" in str(err.value) and "head" not in str(err.value).split("(")[1].split(")")[0]
    client = MlflowClient(tracking_uri(layout))
    assert client.search_model_versions("name = 'xfer'") == [], "nothing registered"
    experiment = client.get_experiment_by_name("xfer").experiment_id
    (run,) = [r for r in client.search_runs([experiment]) if "promotion.decision" in r.data.tags]
    assert run.data.tags["promotion.decision"] == "refused"
    assert "not registered" in run.data.tags["promotion.reason"]
    # The measurements themselves are kept: eval.json says what the model does.
    assert json.loads(layout.metrics("eval").read_text())["finetune"]["target_val"]["n"] == 30


# --- The checkpoint is removed only after the model is saved ---------------------------------------


def test_a_finetune_killed_right_after_writing_the_model_resumes_instead_of_retraining(tmp_path, base, prefect_api, caplog):
    from flows.stages import STAGE_FLOWS
    from xfer.checkpoints import CHECKPOINT_FILE

    root = _copy(base, tmp_path / "p")
    layout = Layout(root)
    weights, checkpoint = layout.finetune_dir / "model.pt", layout.checkpoints / "finetune" / CHECKPOINT_FILE
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.stages", "finetune", "--root", str(root)],
        cwd=REPO,
        env=stage_env(prefect_api),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not weights.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert weights.exists(), (
            f"the stage ended (rc {proc.poll()}) without writing {weights}: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
        )
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    # Before: the checkpoint was deleted before model.pt was written, so nothing was left to resume.
    assert checkpoint.is_file(), "the checkpoint must outlive the model write"
    written = weights.read_bytes()

    with caplog.at_level(logging.WARNING, logger="xfer.finetune"):
        STAGE_FLOWS["finetune"](root=str(root))
    assert "resuming the checkpoint" in caplog.text and "after epoch 1 of 1" in caplog.text
    assert weights.read_bytes() == written, "resumed at the last epoch, the kept weights are the killed run's"
    assert not checkpoint.exists(), "a finished stage removes its checkpoint"


# --- Disk full: the path, the bytes needed and free; finished shards kept ---------------------------

# resnet50's 2048 features make a 192-row shard 1,572,992 bytes and the 48-row rest 393,344: a
# 1,300,000-byte file-size limit stops the first and lets the second (and mlflow.db, ~1 MB) through.
FILE_SIZE_LIMIT = 1_300_000
BIG_FEATURES = {
    "backbone": {"name": "resnet50", "pretrained": False, "weights": None, "image_size": 32},
    "features": {"batch_size": 64, "shard_rows": 192, "runner": {"kind": "threads", "workers": 2, "address": None, "retries": 0}},
}


def _limited(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_features_under_a_file_size_limit_name_the_cause_keep_the_finished_shard_and_rerun_the_rest(tmp_path, base, prefect_api, caplog):
    from flows.stages import STAGE_FLOWS
    from xfer.features import shard_path

    params = copy.deepcopy(TINY_PARAMS)
    for section, values in BIG_FEATURES.items():
        params[section].update(values)
    root = _copy(base, tmp_path / "p", params, without=("feature-cache", "features", "models", "metrics", "plots"))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.stages", "features", "--root", str(root)],
        cwd=REPO,
        env=stage_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limited(FILE_SIZE_LIMIT),
    )
    assert proc.returncode != 0
    cache = Layout(root).feature_cache
    (shards,) = cache.glob("*.shards")
    big, small = shard_path(shards, 0, 192), shard_path(shards, 192, 240)
    # Before: "OSError: 1572864 requested and 1299872 written", which does not say why.
    assert f"no room to write {big}: it needs 1,572,992 bytes" in proc.stderr, proc.stderr[-3000:]
    assert "bytes free" in proc.stderr and f"files of at most {FILE_SIZE_LIMIT:,} bytes" in proc.stderr
    assert small.is_file() and not big.exists(), "the finished shard is kept, the failed one leaves no partial file"
    assert not any(p.suffix == ".tmp" for p in shards.iterdir())

    with caplog.at_level(logging.INFO):
        result = STAGE_FLOWS["features"](root=str(root))
    assert not result["cache_hit"]
    assert "resnet50: 2 shards of 192 rows, 1 to compute" in caplog.text
    assert (Layout(root).features_current / "features.npy").stat().st_size == 240 * 2048 * 4 + 128


def test_an_atomic_write_under_a_file_size_limit_names_path_bytes_and_limit_and_leaves_nothing(tmp_path):
    """The same for any atomic write (json, torch, bytes): a child process with a 10,000-byte limit writes 20,000."""
    dest = tmp_path / "metrics" / "big.json"
    code = "import sys; from xfer.io import write_bytes; write_bytes(sys.argv[1], b'x' * 20_000)"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(dest)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limited(10_000),
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"xfer.io.NoSpaceError: [Errno {errno.EFBIG}] no room to write {dest}: it needs 20,000 bytes, and stopped after 10,000;"), last
    assert "bytes free" in last and "files of at most 10,000 bytes" in last and "EFBIG" in last
    assert list(dest.parent.iterdir()) == [], "no partial file, no temporary file"
