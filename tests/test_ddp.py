"""Data-parallel fine-tuning: 2 CPU processes with the gloo backend, under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from helpers import write_params

TESTS = Path(__file__).parent


def torchrun(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_two_gloo_processes_train_disjoint_shards_into_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = torchrun(str(TESTS / "ddp_child.py"), str(tmp_path), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Averaged gradients from a broadcast start, BatchNorm statistics synchronised: one model.
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Each epoch: 64 rows -> 32 per rank -> 4 batches of 8; the two shards never overlap.
    rows = {r: [int(v) for v in (tmp_path / f"rank{r}_rows.txt").read_text().split()] for r in (0, 1)}
    for epoch in range(2):
        shard0, shard1 = set(rows[0][epoch * 32 : (epoch + 1) * 32]), set(rows[1][epoch * 32 : (epoch + 1) * 32])
        assert len(shard0) == len(shard1) == 32 and not shard0 & shard1
    # Only rank 0 reports and checkpoints; a finished run leaves no checkpoint.
    assert (tmp_path / "epochs.txt").read_text().split("\n")[:-1] == ["0 0", "1 0", "2 0"]
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_the_finetune_stage_with_two_devices_runs_torchrun_and_logs_from_rank_0(pipeline_project, tmp_path, tiny_params):
    """finetune.devices: 2 on a CPU: two gloo workers, one set of outputs, the epochs in MLflow."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.stages import STAGE_FLOWS
    from tasks import tracking
    from xfer.finetune import load_classifier
    from xfer.layout import Layout

    source, _ = pipeline_project
    root = tmp_path / "project"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "models", "metrics"))
    tiny_params["finetune"].update(devices=2, device="cpu", epochs=2)
    write_params(root, tiny_params)
    summary = STAGE_FLOWS["finetune"](root=str(root))
    assert summary["processes"] == 2
    assert json.loads((root / "metrics/finetune.json").read_text()) == summary
    model, spec = load_classifier(root / "models/finetune")
    assert spec.num_classes == 10
    assert not (root / "checkpoints" / "finetune").exists()
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("xfer").experiment_id], "tags.`xfer.stage` = 'finetune'")
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "finetune.source_val_accuracy")]
    assert steps == [0, 1, 2]
    # The learning curve, from the history rank 0 left (the copied project had a 1-epoch one).
    curve = (root / "plots/finetune/learning_curve.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == ["0", "1", "2"]
