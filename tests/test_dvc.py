"""Real DVC in a real git repo: reproducibility, precise invalidation, safety."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REPO, TINY_PARAMS, write_params

CODE = ["xfer", "tasks", "flows", "dvc.yaml"]


def sh(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_digest(root: Path, parts) -> dict[str, str]:
    out = {}
    for part in parts:
        for p in sorted((root / part).rglob("*") if (root / part).is_dir() else [root / part]):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("dvcrepo")
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    write_params(root, TINY_PARAMS)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_api}
    env.pop("XFER_PIPELINE_RUN_ID", None)
    sh(["git", "init", "-q"], root, env)
    sh(["git", "config", "user.email", "ci@example.invalid"], root, env)
    sh(["git", "config", "user.name", "ci"], root, env)
    dvc = str(Path(sys.executable).parent / "dvc")
    sh([dvc, "init", "-q"], root, env)
    sh([dvc, "config", "core.analytics", "false"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    first = sh([dvc, "repro"], root, env)
    return root, env, dvc, first


def test_repro_runs_every_stage_then_nothing(repo):
    root, env, dvc, first = repo
    for stage in ["fetch", "split", "features", "head", "finetune", "evaluate"]:
        assert f"Running stage '{stage}'" in first.stdout
    again = sh([dvc, "repro"], root, env)
    assert "Running stage" not in again.stdout
    status = sh([dvc, "status"], root, env)
    assert "up to date" in status.stdout
    shown = json.loads(sh([dvc, "metrics", "show", "--json"], root, env).stdout)
    assert "metrics/eval.json" in json.dumps(shown)


def test_stage_processes_group_under_one_pipeline_run(repo):
    """Six processes, one MLflow parent: the run keyed by params and git commit."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks import tracking
    from xfer.config import load_params
    from xfer.layout import Layout

    root, env, _, _ = repo
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    exp = client.get_experiment_by_name("xfer")
    stages = client.search_runs([exp.experiment_id], "tags.`xfer.kind` = 'stage'")
    parents = {r.data.tags["mlflow.parentRunId"] for r in stages}
    assert len(stages) == 6 and len(parents) == 1
    parent = client.get_run(parents.pop())
    commit = sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert parent.data.tags["xfer.pipeline_key"] == tracking.pipeline_key(load_params(root / "params.yaml"), commit)
    assert {r.data.tags["git_commit"] for r in stages} == {commit}


def test_head_method_change_reruns_head_and_evaluate_only(repo):
    root, env, dvc, _ = repo
    before = tree_digest(root, ["data/features", "models/finetune"])
    exp = sh([dvc, "exp", "run", "-S", "head.method=mcc", "-S", "head.epochs=2"], root, env)
    ran = {line.split("'")[1] for line in exp.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"head", "evaluate"}, exp.stdout
    assert tree_digest(root, ["data/features", "models/finetune"]) == before
    assert yaml.safe_load((root / "params.yaml").read_text())["head"]["method"] == "mcc"
    assert json.loads((root / "metrics/head.json").read_text())["method"] == "mcc"
    # The experiment is recorded with its params and metrics, for `dvc exp show`.
    table = sh([dvc, "exp", "show", "--csv"], root, env).stdout
    header, *lines = table.splitlines()
    assert "head.target_test.accuracy" in header and "head.method" in header
    assert len(lines) >= 2


def test_bad_params_fail_fast_and_change_no_output(repo):
    root, env, dvc, _ = repo
    outputs = ["data", "models", "metrics", "plots"]
    before = tree_digest(root, outputs)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["head"]["learning_rate"] = 0.1  # unknown key
    write_params(root, params)
    try:
        bad = sh([dvc, "repro"], root, env, check=False)
        assert bad.returncode != 0
        assert "head.learning_rate" in bad.stderr + bad.stdout
        params["head"].pop("learning_rate")
        params["finetune"]["epochs"] = "three"  # wrong type
        write_params(root, params)
        bad = sh([dvc, "repro"], root, env, check=False)
        assert bad.returncode != 0 and "finetune.epochs" in bad.stderr + bad.stdout
        assert tree_digest(root, outputs) == before
    finally:
        params["finetune"]["epochs"] = TINY_PARAMS["finetune"]["epochs"]
        write_params(root, params)


def test_prefect_pipeline_writes_what_dvc_writes(repo, pipeline_project):
    """Same params, two runners (fresh DVC repo vs one Prefect flow): same files."""
    root, env, dvc, _ = repo
    # The exp run above changed head params; bring the workspace back to the committed params.
    sh(["git", "checkout", "params.yaml"], root, env)
    sh([dvc, "repro"], root, env)
    other, _ = pipeline_project
    assert (root / "data/splits/manifest.csv").read_bytes() == (other / "data/splits/manifest.csv").read_bytes()
    key = json.loads((root / "data/features/current.json").read_text())["key"]
    assert key == json.loads((other / "data/features/current.json").read_text())["key"]
    np.testing.assert_allclose(np.load(root / f"data/features/{key}/features.npy"), np.load(other / f"data/features/{key}/features.npy"), atol=1e-5)
    ours = json.loads((root / "metrics/eval.json").read_text())
    theirs = json.loads((other / "metrics/eval.json").read_text())
    for model in ("head", "finetune"):
        for split in ("source_test", "target_test"):
            assert ours[model][split]["accuracy"] == pytest.approx(theirs[model][split]["accuracy"], abs=0.02)
