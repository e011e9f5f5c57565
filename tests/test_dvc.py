"""Real DVC in a real git repo: reproducibility, precise invalidation, safety."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
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


def make_repo(root: Path, params: dict, prefect_api: str):
    """The project's code and `params` in a fresh git + DVC repo at `root`: (env, dvc)."""
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    write_params(root, params)
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
    return env, dvc


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("dvcrepo")
    env, dvc = make_repo(root, TINY_PARAMS, prefect_api)
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
    # `dvc metrics show` lists each model's ROC AUC per split, as eval.json holds it.
    table = sh([dvc, "metrics", "show"], root, env).stdout
    assert "head.target_test.roc_auc" in table and "finetune.source_test.roc_auc" in table
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert f"{ev['head']['target_test']['roc_auc']:.5f}" in table


def test_dvc_plots_show_draws_learning_curves_and_confusion_matrices(repo, tmp_path):
    """`dvc plots show` on what `dvc repro` wrote: the curves per epoch, a confusion matrix per
    model from its predictions, a ROC curve per model, the stage figures as images, and nothing drawn twice."""
    root, env, dvc, _ = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    shown = json.loads(sh([dvc, "plots", "show", "--json", "-o", str(tmp_path / "dvc_plots")], root, env).stdout)["data"]
    kinds = {plot_id: renders[0]["type"] for plot_id, renders in shown.items()}
    evaluate_files = sorted(p.name for p in (root / "plots/evaluate").iterdir())
    predictions = {f"plots/evaluate/{name}" for name in evaluate_files if name.endswith(".csv")}
    roc = {f"plots/roc/roc_{model}_target_test.csv" for model in ("head", "finetune", "fusion")}
    assert {f"plots/roc/{p.name}" for p in (root / "plots/roc").iterdir()} == roc
    assert {k for k, v in kinds.items() if v == "vega"} == {"head_accuracy", "head_loss", "finetune_accuracy", "finetune_loss"} | predictions | roc
    images = {f"plots/evaluate/{name}" for name in evaluate_files if name.endswith(".png")}
    images |= {"plots/head/tsne.png", "plots/head/learning_curves.png", "plots/finetune/learning_curves.png"}
    assert {k for k, v in kinds.items() if v == "image"} == images

    def values(plot_id):
        return shown[plot_id][0]["content"]["data"]["values"]

    def curve(plot_id, field):
        return [(int(v["epoch"]), v[field]) for v in values(plot_id) if v.get("field", field) == field and v[field] != ""]

    head = json.loads((root / "metrics/head.json").read_text())
    head_acc = curve("head_accuracy", "source_val_accuracy")
    assert [e for e, _ in head_acc] == list(range(1, params["head"]["epochs"] + 1))
    assert float(dict(head_acc)[head["best_epoch"]]) == pytest.approx(head["source_val_accuracy"])
    assert [e for e, _ in curve("head_loss", "train_loss")] == list(range(1, params["head"]["epochs"] + 1))
    finetune = json.loads((root / "metrics/finetune.json").read_text())
    ft_acc = curve("finetune_accuracy", "source_val_accuracy")
    assert [e for e, _ in ft_acc] == list(range(0, params["finetune"]["epochs"] + 1))
    assert float(dict(ft_acc)[finetune["best_epoch"]]) == pytest.approx(finetune["source_val_accuracy"])
    assert [e for e, _ in curve("finetune_loss", "train_loss")] == list(range(1, params["finetune"]["epochs"] + 1))

    scores = json.loads((root / "metrics/eval.json").read_text())
    for model in ("head", "finetune", "fusion"):
        plot_id = f"plots/evaluate/predictions_{model}_target_test.csv"
        spec = shown[plot_id][0]["content"]["spec"]
        # DVC's confusion template: counts of (actual, predicted) pairs.
        assert spec["transform"][0]["groupby"] == ["actual", "predicted"]
        assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"]) == ("predicted", "actual")
        rows = values(plot_id)
        assert len(rows) == scores[model]["target_test"]["n"]
        assert np.mean([r["actual"] == r["predicted"] for r in rows]) == pytest.approx(scores[model]["target_test"]["accuracy"])
        roc = shown[f"plots/roc/roc_{model}_target_test.csv"][0]["content"]
        assert (roc["encoding"]["x"]["field"], roc["encoding"]["y"]["field"]) == ("fpr", "tpr")  # the simple template: a line
        points = [(float(v["fpr"]), float(v["tpr"])) for v in roc["data"]["values"]]
        assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)


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


def test_head_method_auto_reruns_head_and_evaluate_only_and_logs_every_candidate(repo):
    """`dvc exp run -S head.method=auto`: the search runs in the head stage, each candidate
    an MLflow child run of it; finetune (not auto) never reads the pick, so it does not rerun."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks import tracking
    from xfer.layout import Layout

    root, env, dvc, _ = repo
    before = tree_digest(root, ["data/features", "models/finetune", "models/head_pick.json"])
    exp = sh([dvc, "exp", "run", "-S", "head.method=auto", "-S", "head.selection=info_max", "-S", "head.epochs=2"], root, env)
    assert ran_stages(exp) == {"head", "evaluate"}, exp.stdout
    assert tree_digest(root, ["data/features", "models/finetune", "models/head_pick.json"]) == before
    assert yaml.safe_load((root / "params.yaml").read_text())["head"]["method"] == "auto"
    head = json.loads((root / "metrics/head.json").read_text())
    search = head["search"]
    assert head["method_requested"] == "auto" and head["method"] in {c["method"] for c in search["candidates"]}
    assert search["pick"] in {c["name"] for c in search["candidates"]} and search["why"].startswith("info_max ranks")
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    exp_id = client.get_experiment_by_name("xfer").experiment_id
    head_run = client.search_runs([exp_id], "tags.`xfer.stage` = 'head'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{head_run.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(c["name"] for c in search["candidates"])
    assert all("validators.info_max" in r.data.metrics for r in children)
    assert head_run.data.tags["search.pick"] == search["pick"] and "search.guard" in head_run.data.tags
    # The experiment is recorded with its params and metrics, for `dvc exp show`.
    table = sh([dvc, "exp", "show", "--csv"], root, env).stdout
    header, *lines = table.splitlines()
    assert "head.target_test.accuracy" in header and "head.method" in header
    assert len(lines) >= 2


def test_cross_validation_reruns_evaluate_only_and_reports_fold_means_and_stds(repo):
    """`dvc exp run -S evaluate.cv_folds=5`: only evaluate reruns; eval.json, `dvc metrics show`,
    xfer summary and the evaluate run in MLflow hold the folds' means and stds."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks import tracking
    from xfer import features as feats
    from xfer.cross_validation import make_folds
    from xfer.layout import Layout

    root, env, dvc, _ = repo
    before = tree_digest(root, ["data", "models", "plots/head", "plots/finetune"])
    exp = sh([dvc, "exp", "run", "-S", "evaluate.cv_folds=5"], root, env)
    assert ran_stages(exp) == {"evaluate"}, exp.stdout
    assert tree_digest(root, ["data", "models", "plots/head", "plots/finetune"]) == before
    cv = json.loads((root / "metrics/eval.json").read_text())["cross_validation"]
    assert cv["folds"] == 5 and len(cv["per_fold"]) == 5
    for where in ("held_out", "target_test"):
        values = [f[where]["accuracy"] for f in cv["per_fold"]]
        assert cv[where]["accuracy"]["mean"] == pytest.approx(np.mean(values))
        assert cv[where]["accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))
    # The folds are the labelled training rows; no target test row is in any (the features' own index).
    folds = make_folds(feats.load_current(root / "data/features/current"), 5, seed=yaml.safe_load((root / "params.yaml").read_text())["seed"])
    index = feats.load_current(root / "data/features/current").index
    assert cv["rows"] == len(folds.rows) and not ((index.role == "target") & (index.split == "test")).to_numpy()[folds.rows].any()
    assert "cross_validation.held_out.accuracy.mean" in sh([dvc, "metrics", "show"], root, env).stdout
    summary = sh([sys.executable, "-m", "cli", "summary", str(root / "metrics/eval.json")], Path(__file__).resolve().parents[1], env).stdout
    assert "cross-validation of the head" in summary and f"{cv['target_test']['accuracy']['mean']:.3f} ± " in summary
    mlflow.set_tracking_uri(tracking.tracking_uri(Layout(root)))
    client = MlflowClient()
    exp_id = client.get_experiment_by_name("xfer").experiment_id
    run = client.search_runs([exp_id], "tags.`xfer.stage` = 'evaluate'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.data.metrics["cross_validation.target_test.accuracy.std"] == pytest.approx(cv["target_test"]["accuracy"]["std"])


def test_fine_tuning_cross_validation_reruns_evaluate_only_and_trains_once_per_fold(repo):
    """`-S finetune.cv=true`: evaluate alone reruns (the finetune stage does not read the key) and runs
    the fine-tuning recipe once per fold; eval.json and xfer summary hold its means and stds."""
    root, env, dvc, _ = repo
    sh(["git", "checkout", "params.yaml"], root, env)
    sh([dvc, "repro"], root, env)
    before = tree_digest(root, ["data", "models", "plots/head", "plots/finetune"])
    try:
        exp = sh([dvc, "exp", "run", "-S", "evaluate.cv_folds=3", "-S", "finetune.cv=true"], root, env)
        assert ran_stages(exp) == {"evaluate"}, exp.stdout
        assert tree_digest(root, ["data", "models", "plots/head", "plots/finetune"]) == before
        results = json.loads((root / "metrics/eval.json").read_text())
        cv = results["cross_validation_finetune"]
        assert cv["folds"] == 3 and [f["fold"] for f in cv["per_fold"]] == [0, 1, 2]
        assert cv["rows"] == results["cross_validation"]["rows"] and cv["fold_sizes"] == results["cross_validation"]["fold_sizes"]
        assert cv["recipe"]["strategy"] == TINY_PARAMS["finetune"]["strategy"] and cv["recipe"]["method"] == TINY_PARAMS["finetune"]["method"]
        values = [f["target_test"]["accuracy"] for f in cv["per_fold"]]
        assert cv["target_test"]["accuracy"]["mean"] == pytest.approx(np.mean(values))
        # Each fold's model is scored on its own held-out rows: together, every labelled training row once.
        assert sum(f["held_out"]["n"] for f in cv["per_fold"]) == cv["rows"]
        summary = sh([sys.executable, "-m", "cli", "summary", str(root / "metrics/eval.json")], REPO, env).stdout
        assert "cross-validation of fine-tuning" in summary
        assert not list((root / "checkpoints").glob("evaluate-cv/*"))  # the folds' projects are gone
    finally:
        sh(["git", "checkout", "params.yaml"], root, env)


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
    key = json.loads((root / "data/features/current/meta.json").read_text())["key"]
    assert key == json.loads((other / "data/features/current/meta.json").read_text())["key"]
    np.testing.assert_allclose(np.load(root / "data/features/current/features.npy"), np.load(other / "data/features/current/features.npy"), atol=1e-5)
    ours = json.loads((root / "metrics/eval.json").read_text())
    theirs = json.loads((other / "metrics/eval.json").read_text())
    for model in ("head", "finetune"):
        for split in ("source_test", "target_test"):
            assert ours[model][split]["accuracy"] == pytest.approx(theirs[model][split]["accuracy"], abs=0.02)


def test_push_and_pull_through_a_local_remote_restore_data_and_manifest(repo, tmp_path):
    root, env, dvc, _ = repo
    tracked = ["data/raw", "data/splits"]
    before = tree_digest(root, tracked)
    sh([dvc, "remote", "add", "-d", "--local", "shared", str(tmp_path / "remote")], root, env)
    sh([dvc, "push"], root, env)
    for part in tracked:
        shutil.rmtree(root / part)
    shutil.rmtree(root / ".dvc" / "cache")
    pulled = sh([dvc, "pull"], root, env)
    assert tree_digest(root, tracked) == before, pulled.stdout
    assert "Running stage" not in sh([dvc, "repro"], root, env).stdout


def ran_stages(proc) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def features_outs(root: Path) -> dict[str, str]:
    """{out path: hash} of the features stage in dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"]["features"]["outs"]}


def xfer_cache(root: Path, env, *args) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "cli", "cache", *args, "--root", str(root)], REPO, env, check=False)


def test_fusion_backbones_rerun_features_head_and_evaluate_never_finetune(repo):
    """Acceptance: adding a fusion backbone, then removing it, never reruns finetune; the
    cache keeps the member's entry, but dvc.lock does not depend on it."""
    from xfer.config import BackboneConfig, member_name

    root, env, dvc, _ = repo
    sh(["git", "checkout", "params.yaml"], root, env)
    sh([dvc, "repro"], root, env)
    before = features_outs(root)
    assert set(before) == {"data/features/current", "data/features/members"}
    finetune_before = tree_digest(root, ["models/finetune"])
    member = BackboneConfig(name="test_resnet", pretrained=False, image_size=40)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fusion"]["backbones"] = [member.model_dump(mode="json")]
    write_params(root, params)

    added = sh([dvc, "repro"], root, env)
    assert "Running stage 'finetune'" not in added.stdout
    assert ran_stages(added) == {"features", "head", "evaluate"}, added.stdout
    assert member_name(member) in json.loads((root / "metrics/eval.json").read_text())
    with_member = features_outs(root)
    assert with_member["data/features/current"] == before["data/features/current"]
    assert with_member["data/features/members"] != before["data/features/members"]
    assert "up to date" in sh([dvc, "status"], root, env).stdout

    # fusion.mode features: one head on both backbones' features side by side, its own
    # row; only head and evaluate rerun, and the member's own head and row go.
    params["fusion"]["mode"] = "features"
    write_params(root, params)
    fused = sh([dvc, "repro"], root, env)
    assert ran_stages(fused) == {"head", "evaluate"}, fused.stdout
    scores = json.loads((root / "metrics/eval.json").read_text())
    assert "feature_fusion" in scores and member_name(member) not in scores
    assert 0 <= scores["feature_fusion"]["target_test"]["accuracy"] <= 1
    dims = [json.loads((root / f"data/features/{part}/meta.json").read_text())["dim"] for part in ("current", f"members/{member_name(member)}")]
    assert json.loads((root / "metrics/head.json").read_text())["feature_fusion"]["dim"] == sum(dims)
    assert not (root / "models/head/members" / member_name(member)).exists()
    assert features_outs(root) == with_member and tree_digest(root, ["models/finetune"]) == finetune_before

    sh(["git", "checkout", "params.yaml"], root, env)
    removed = sh([dvc, "repro"], root, env)
    assert not (root / "models/head/feature_fusion").exists()
    assert "Running stage 'finetune'" not in removed.stdout
    assert ran_stages(removed) == {"features", "head", "evaluate"}, removed.stdout
    assert "up to date" in sh([dvc, "status"], root, env).stdout
    assert tree_digest(root, ["models/finetune"]) == finetune_before
    # The member's entry stays in the cache (switching back is free), yet the features
    # outs are what they were before it was ever computed: dvc.lock ignores the cache.
    listed = xfer_cache(root, env, "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if re.match(r"[0-9a-f]{16} ", line)}
    current = json.loads((root / "data/features/current/meta.json").read_text())["key"]
    assert len(rows) == 2 and rows[current].split()[1:3] == ["test_efficientnet", "32"] and rows[current].endswith("current"), listed.stdout
    (stale,) = set(rows) - {current}
    assert rows[stale].split()[1:3] == ["test_resnet", "40"] and rows[stale].endswith(" -"), listed.stdout
    assert features_outs(root) == before


def test_cache_gc_keeps_what_the_outputs_hold_and_frees_the_rest(repo):
    """`xfer cache gc` on the cache the runs above left: the stale member goes, current stays, nothing reruns."""
    root, env, dvc, _ = repo
    cache = root / "data/feature-cache"
    current = json.loads((root / "data/features/current/meta.json").read_text())["key"]
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert current in entries and len(entries) == 2, entries
    stale = next(k for k in entries if k != current)
    stale_bytes = sum(p.stat().st_size for p in (cache / stale).iterdir())

    dry = xfer_cache(root, env, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {stale}" in dry.stdout and current not in dry.stdout.split("in use")[0]
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == entries

    done = xfer_cache(root, env, "gc")
    assert done.returncode == 0, done.stderr
    assert f"removed {stale}" in done.stdout and f"{current} (current)" in done.stdout
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [current]
    assert stale_bytes > 0 and "freed 0 B" not in done.stdout
    assert "up to date" in sh([dvc, "status"], root, env).stdout
    assert "Running stage" not in sh([dvc, "repro"], root, env).stdout


def test_damaged_features_are_computed_again_not_passed_on(repo):
    """A byte changed in the published features (and the cache entry it may share an inode
    with): dvc repro reruns features, which recomputes the entry; nothing else reruns."""
    root, env, dvc, _ = repo
    published = root / "data/features/current/features.npy"
    key = json.loads((root / "data/features/current/meta.json").read_text())["key"]
    entry = root / "data/feature-cache" / key / "features.npy"
    good = published.read_bytes()
    assert entry.read_bytes() == good
    # One write per inode: the two may be hard links of one file.
    for path in {p.stat().st_ino: p for p in (published, entry)}.values():
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(bytes([good[-1] ^ 0xFF]))
    assert published.read_bytes() != good and entry.read_bytes() != good
    # The readers refuse the damaged output outright.
    run = sh([sys.executable, "-m", "flows.stages", "head", "--root", str(root)], REPO, env, check=False)
    assert run.returncode != 0 and "damaged" in run.stdout + run.stderr
    again = sh([dvc, "repro"], root, env)
    assert ran_stages(again) == {"features"}, again.stdout
    assert published.read_bytes() == good and entry.read_bytes() == good
    assert "up to date" in sh([dvc, "status"], root, env).stdout


def test_the_rank_stage_runs_alone_once_rank_backbones_switches_it_on(repo):
    """Optional: off in dvc.yaml by default; rank.backbones set and dvc.yaml regenerated, `dvc repro`
    runs rank alone (the chain is up to date), writes its metrics, plot and MLflow run, then nothing."""
    import sqlite3

    root, env, dvc, _ = repo
    sh(["git", "checkout", "params.yaml", "dvc.yaml"], root, env)
    sh([dvc, "repro"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["rank"] = {"backbones": [params["backbone"], {"name": "test_resnet", "pretrained": False, "image_size": 32}]}
    write_params(root, params)
    sh([sys.executable, "-m", "xfer.contract", "--write"], root, env)
    try:
        ran = sh([dvc, "repro"], root, env)
        assert ran_stages(ran) == {"rank"}, ran.stdout
        result = json.loads((root / "metrics/rank.json").read_text())
        assert [r["candidate"] for r in result["backbones"]] == ["test_efficientnet 32px random init", "test_resnet 32px random init"]
        assert result["backbones"][0]["cache_hit"]  # the features stage's entry, reused
        assert (root / "plots/rank/rank.png").is_file()
        with sqlite3.connect(root / "mlflow.db") as db:
            tags = dict(db.execute("select t.key, t.value from tags t join runs r on r.run_uuid = t.run_uuid where r.name = 'rank'").fetchall())
        assert tags["rank.recommended"] == result["recommended"]
        assert "Running stage" not in sh([dvc, "repro"], root, env).stdout
    finally:
        sh(["git", "checkout", "params.yaml", "dvc.yaml"], root, env)


def test_the_translate_stage_runs_in_dvc_repro_and_finetune_reads_its_images_only_when_asked(repo):
    """Acceptance 4: translate.enabled and dvc.yaml regenerated, `dvc repro` runs translate alone (no
    other stage's deps or params change); its grid and per-epoch losses are in MLflow. Then
    finetune.source_images translated reruns finetune and evaluate, which train on the copies."""
    from mlflow.tracking import MlflowClient

    root, env, dvc, _ = repo
    sh(["git", "checkout", "params.yaml", "dvc.yaml"], root, env)
    sh([dvc, "repro"], root, env)
    before = tree_digest(root, ["data/features", "models", "metrics/eval.json"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["translate"] |= {"enabled": True, "image_size": 16, "channels": 4, "residual_blocks": 1, "epochs": 2, "batch_size": 8, "device": "cpu"}
    write_params(root, params)
    sh([sys.executable, "-m", "xfer.contract", "--write"], root, env)
    try:
        ran = sh([dvc, "repro"], root, env)
        assert ran_stages(ran) == {"translate"}, ran.stdout
        assert tree_digest(root, ["data/features", "models", "metrics/eval.json"]) == before
        summary = json.loads((root / "metrics/translate.json").read_text())
        index = pd.read_csv(root / "data/translated/index.csv")
        manifest = pd.read_csv(root / "data/splits/manifest.csv")
        assert index.source_path.tolist() == manifest[(manifest.role == "source") & (manifest.split == "train")].path.tolist()
        assert summary["epochs"] == 2 and summary["source_images"] == len(index)
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        [run] = client.search_runs([client.get_experiment_by_name("xfer").experiment_id], "attributes.run_name = 'translate'")
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/grid.png", "plots/learning_curves.png"}
        assert [m.step for m in client.get_metric_history(run.info.run_id, "translate.cycle_loss")] == [1, 2]
        assert "Running stage" not in sh([dvc, "repro"], root, env).stdout

        params["finetune"]["source_images"] = "translated"
        write_params(root, params)
        bad = sh([dvc, "repro"], root, env, check=False)
        assert bad.returncode != 0 and "does not list it among its deps" in bad.stdout + bad.stderr
        sh([sys.executable, "-m", "xfer.contract", "--write"], root, env)
        ran = sh([dvc, "repro"], root, env)
        assert ran_stages(ran) == {"finetune", "evaluate"}, ran.stdout
        assert "data/translated" in yaml.safe_load((root / "dvc.lock").read_text())["stages"]["finetune"]["deps"].__str__()
        [run] = client.search_runs([client.get_experiment_by_name("xfer").experiment_id], "attributes.run_name = 'finetune'", max_results=1)
        assert run.data.params["finetune.source_images"] == "translated"
    finally:
        sh(["git", "checkout", "params.yaml", "dvc.yaml"], root, env)


def test_a_local_two_domain_folder_runs_end_to_end(tmp_path, prefect_api):
    """Acceptance: the user's own ImageFolder domains (outside the repo) through `dvc repro`,
    on a timm model's pretrained weights from the hub cache, offline."""
    from datasets import image_folder
    from helpers import HUB_MODEL, hub_cache, hub_weights

    image_folder(tmp_path / "shelves", {"store_a": 10, "store_b": 8}, wrapper="export", inner="images")
    params = json.loads(json.dumps(TINY_PARAMS))
    params["data"].update(dataset="../shelves", source_domain="store_a", target_domain="store_b")
    params["data"]["split"].update(target_shots=1)
    params["backbone"].update(name=HUB_MODEL, pretrained=True)
    snapshot = hub_cache(tmp_path / "hub", hub_weights(seed=1))
    root = tmp_path / "project"
    root.mkdir()
    env, dvc = make_repo(root, params, prefect_api)
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    run = sh([dvc, "repro"], root, env)
    # The features were made by the file in the cache: its sha256 is in the cache key's record.
    digest = hashlib.sha256(snapshot.read_bytes()).hexdigest()
    assert json.loads((root / "data/features/current/meta.json").read_text())["weights_digest"] == digest
    for stage in ["fetch", "split", "features", "head", "finetune", "evaluate"]:
        assert f"Running stage '{stage}'" in run.stdout
    manifest = (root / "data/splits/manifest.csv").read_text()
    assert "data/raw/shelves/store_b/cat/" in manifest
    report = json.loads((root / "data/raw/shelves/validation.json").read_text())
    assert report["domains"]["store_a"]["images"] == 30 and report["domains"]["store_b"]["images"] == 24
    split = json.loads((root / "data/splits/report.json").read_text())
    assert split["rows"]["target/train"] == 3
    scores = json.loads((root / "metrics/eval.json").read_text())
    assert 0 <= scores["head"]["target_test"]["accuracy"] <= 1
    # Changing only the split seed reruns split and after, never fetch.
    again = sh([dvc, "exp", "run", "-S", "seed=1"], root, env)
    ran = {line.split("'")[1] for line in again.stdout.splitlines() if line.startswith("Running stage")}
    assert "fetch" not in ran and "split" in ran, again.stdout


def test_the_stage_checks_stop_before_the_first_stage_when_the_weights_cannot_be_had(tmp_path):
    """`make run` checks every stage before `dvc repro` starts: with an empty cache and no hub
    it stops there, with the error, and nothing is written."""
    from helpers import HUB_MODEL

    hub_env = tmp_path / "empty_hub"
    hub_env.mkdir()
    params = json.loads(json.dumps(TINY_PARAMS))
    params["backbone"].update(name=HUB_MODEL, pretrained=True)
    write_params(tmp_path, params)
    hub_env.rmdir()  # not even the folder
    before = sorted(p.name for p in tmp_path.iterdir())
    run = subprocess.run(
        [sys.executable, "-m", "flows.stages", "--check", "--root", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_env)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"pretrained weights for '{HUB_MODEL}' are not in the hub cache {hub_env}" in run.stderr and "backbone.weights" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_features_on_cuda_without_cuda_is_refused_by_the_checks(tmp_path, capsys):
    import torch

    from flows.stages import check_params

    params = json.loads(json.dumps(TINY_PARAMS))
    params["features"]["device"] = "cuda"
    write_params(tmp_path, params)
    if torch.cuda.is_available():
        assert check_params(str(tmp_path))
    else:
        assert not check_params(str(tmp_path))
        assert "features.device: 'cuda' was asked for but no CUDA device is available" in capsys.readouterr().err
    params["features"].update(device="cpu", half=True)
    write_params(tmp_path, params)
    assert not check_params(str(tmp_path))
    assert "features.half: true runs float16 on CUDA only" in capsys.readouterr().err


def test_a_filled_label_file_is_a_dep_of_the_split_once_dvc_yaml_lists_it(tmp_path, prefect_api):
    """data.split.target_labels: refused until dvc.yaml lists the file, then filling it in or
    editing it reruns the split, and the manifest holds exactly its rows and labels."""
    import pandas as pd

    root = tmp_path / "project"
    root.mkdir()
    env, dvc = make_repo(root, TINY_PARAMS, prefect_api)
    sh([dvc, "repro", "split"], root, env)
    manifest = pd.read_csv(root / "data/splits/manifest.csv")
    pool = manifest[(manifest.role == "target") & (manifest.split == "unlabeled")]
    chosen = pool.groupby("class_name").head(1).head(3)
    (root / "labels.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(chosen.path, chosen.class_name)))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["split"]["target_labels"] = "labels.csv"
    write_params(root, params)
    before = tree_digest(root, ["data/splits"])
    bad = sh([dvc, "repro", "split"], root, env, check=False)
    assert bad.returncode != 0 and "labels.csv is not a dep of the split stage" in bad.stdout + bad.stderr
    assert tree_digest(root, ["data/splits"]) == before
    sh([sys.executable, "-m", "xfer.contract", "--write"], root, env)
    assert "labels.csv" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["split"]["deps"]
    assert "Running stage 'split'" in sh([dvc, "repro", "split"], root, env).stdout

    def labelled():
        m = pd.read_csv(root / "data/splits/manifest.csv", dtype={"class_name": str})
        train = m[(m.role == "target") & (m.split == "train")]
        return dict(zip(train.path, train.class_name))

    assert labelled() == dict(zip(chosen.path, chosen.class_name.astype(str)))
    assert "Running stage" not in sh([dvc, "repro", "split"], root, env).stdout
    # The person corrects one label: the file's content changed, so the split reruns.
    text = (root / "labels.csv").read_text().splitlines()
    first_path = text[1].split(",")[0]
    other = next(c for c in sorted(manifest.class_name.astype(str).unique()) if c != text[1].split(",")[1])
    (root / "labels.csv").write_text("\n".join([text[0], f"{first_path},{other}", *text[2:]]) + "\n")
    assert "Running stage 'split'" in sh([dvc, "repro", "split"], root, env).stdout
    assert labelled()[first_path] == other
    report = json.loads((root / "data/splits/report.json").read_text())
    assert report["target_labeled"]["labels_file"]["differ_from_folder"] == 1
