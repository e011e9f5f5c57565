"""The `xfer` command as users meet it: `python -m cli`, the console entry's module, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_PARAMS, write_params

# Each command and words its own --help must show (its arguments, not another's).
HELP = {
    "validate": ["usage: xfer validate", "PARAMS"],
    "stage": ["usage: xfer stage", "STAGE", "--root", "fetch, split, features, head, finetune, evaluate, rank"],
    "pipeline": ["usage: xfer pipeline", "--root"],
    "summary": ["usage: xfer summary", "EVAL_JSON"],
    "predict": ["usage: xfer predict", "IMAGE_OR_FOLDER", "--model", "--out", "--tracking-uri", "--batch-size"],
    "monitor": ["usage: xfer monitor", "IMAGES", "--model", "--out", "`path`", "reference window", "monitor"],
    "suggest-labels": ["usage: xfer suggest-labels", "N", "--root", "--out", "--seed", "--force", "data.split.target_labels"],
    "rank": ["usage: xfer rank", "--root", "--seed", "LogME", "rank.backbones"],
    "cache": ["usage: xfer cache", "{list,gc}"],
    "cache list": ["usage: xfer cache list", "--root", "--verify"],
    "cache gc": ["usage: xfer cache gc", "--root", "--dry-run"],
}


def xfer(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_the_console_entry_is_the_module_python_m_cli_runs():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"xfer": "cli.main:main"}
    assert "from cli.main import main" in (REPO / "cli" / "__main__.py").read_text()


def test_top_level_help_lists_every_command():
    proc = xfer("--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: xfer")
    for command in (c for c in HELP if " " not in c):
        assert f"\n    {command} " in proc.stdout or f"\n    {command}\n" in proc.stdout, command


@pytest.mark.parametrize("command", sorted(HELP))
def test_every_command_answers_help_with_its_usage(command, tmp_path):
    proc = xfer(*command.split(), "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for words in HELP[command]:
        assert words in proc.stdout, (command, words, proc.stdout)
    # --help is not taken for a file: nothing was read or written.
    assert list(tmp_path.iterdir()) == []


def test_version_is_the_installed_distributions():
    proc = xfer("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"xfer {version('xfer')}"


def test_no_command_prints_usage_and_exits_2():
    proc = xfer()
    assert proc.returncode == 2 and proc.stderr.startswith("usage: xfer"), proc.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["nope"], "invalid choice: 'nope' (choose from 'validate', 'stage', 'pipeline', 'summary', 'predict', 'monitor', 'suggest-labels', 'rank', 'cache')"),
        (["stage", "fech"], "invalid choice: 'fech' (choose from 'fetch', 'split', 'features', 'head', 'finetune', 'evaluate', 'rank', 'translate')"),
        (["stage"], "the following arguments are required: STAGE"),
        (["predict"], "the following arguments are required: IMAGE_OR_FOLDER"),
        (["predict", "a.png", "--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
        (["monitor"], "the following arguments are required: IMAGES"),
        (["suggest-labels"], "the following arguments are required: N"),
        (["suggest-labels", "three"], "argument N: invalid int value: 'three'"),
        (["summary", "a.json", "b.json"], "unrecognized arguments: b.json"),
        (["--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_arguments_give_one_line_naming_them_and_exit_2(args, expected):
    line = one_line_error(xfer(*args))
    assert line.startswith("xfer") and expected in line, line


def test_stage_names_are_the_flows():
    from cli.main import ALL_STAGE_NAMES
    from flows.stages import STAGE_FLOWS

    assert ALL_STAGE_NAMES == tuple(STAGE_FLOWS) and ALL_STAGE_NAMES[-2:] == ("rank", "translate")


def test_validate_checks_the_file_it_is_given(tmp_path):
    good = write_params(tmp_path, TINY_PARAMS)
    proc = xfer("validate", str(good))
    assert proc.returncode == 0 and proc.stdout.strip() == f"{good}: valid", proc.stdout + proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY_PARAMS, "head": {**TINY_PARAMS["head"], "lr": -1}}))
    proc = xfer("validate", str(bad))
    # A params error lists every invalid key, a line each.
    assert proc.returncode == 2 and "head.lr: Input should be greater than 0" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_stage_and_pipeline_stop_on_bad_params_before_any_flow(tmp_path):
    write_params(tmp_path, {**TINY_PARAMS, "head": {**TINY_PARAMS["head"], "epochs": 0}})
    for args in (["stage", "head", "--root", str(tmp_path)], ["pipeline", "--root", str(tmp_path)]):
        proc = xfer(*args)
        assert proc.returncode == 2 and "head.epochs" in proc.stderr, (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_summary_prints_the_evaluation_table(tmp_path):
    figures = {"accuracy": 0.875, "macro_precision": 0.5, "macro_recall": 0.25, "macro_f1": 0.125, "roc_auc": 0.75}
    # finetune's target val lacks a class: its AUC is null, printed n/a.
    (tmp_path / "eval.json").write_text(json.dumps({"head": {"target_test": figures}, "finetune": {"target_val": figures | {"roc_auc": None}}}))
    proc = xfer("summary", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    header, head, finetune = (line.split() for line in proc.stdout.strip().splitlines()[:3])
    assert header[-1] == "roc_auc"
    assert head == ["head", "target_test", "0.875", "0.500", "0.250", "0.125", "0.750"], proc.stdout
    assert finetune[-1] == "n/a", proc.stdout
    line = one_line_error(xfer("summary", str(tmp_path / "missing.json")))
    assert f"{tmp_path / 'missing.json'} not found" in line


def test_summary_says_how_the_head_was_chosen_and_warns_when_adapting_is_not_backed(tmp_path):
    figures = {"accuracy": 0.875, "macro_precision": 0.5, "macro_recall": 0.25, "macro_f1": 0.125}
    (tmp_path / "eval.json").write_text(json.dumps({"head": {"target_test": figures}}))
    search = {"why": "info_max ranks mcc(mcc_temperature=4) first of 7 candidates, but only 2 of 7 ...", "warning": "the validators disagree"}
    head = {"method": "source_only", "method_requested": "auto", "selection": "info_max", "uses_target_labels": False, "search": search}
    (tmp_path / "head.json").write_text(json.dumps(head))
    out = xfer("summary", str(tmp_path / "eval.json")).stdout
    assert "head: source_only (head.method auto), kept by info_max (no target labels)" in out
    assert "search: info_max ranks mcc" in out and "WARNING: the validators disagree" in out
    (tmp_path / "head.json").write_text(json.dumps(head | {"selection": "target_val", "uses_target_labels": True, "search": {"why": "x", "warning": None}}))
    out = xfer("summary", str(tmp_path / "eval.json")).stdout
    assert "an oracle: it reads target val labels" in out and "WARNING" not in out


# ---- xfer suggest-labels ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """A tiny project through split, features and head, by the stages' core functions (real images, a real head)."""
    from xfer import features as feats
    from xfer.backbones import create_backbone
    from xfer.config import parse_params
    from xfer.data.fetch import fetch_dataset
    from xfer.data.sources import resolve_source
    from xfer.data.split import build_manifest, class_names
    from xfer.head_stage import head_data
    from xfer.heads import save_head, train_head
    from xfer.layout import Layout

    root = tmp_path_factory.mktemp("suggest")
    write_params(root, TINY_PARAMS)
    params, layout = parse_params(TINY_PARAMS), Layout(root)
    fetch_dataset(params.data, layout.raw, layout.downloads, root=root, progress=False)
    manifest, _ = build_manifest(layout.raw / resolve_source(params.data).name, params.data, params.seed, root=root)
    layout.manifest.parent.mkdir(parents=True)
    manifest.to_csv(layout.manifest, index=False)
    model, prep, weights = create_backbone(params.backbone, num_classes=0)
    key = feats.cache_key(params.backbone.name, weights.digest, prep, manifest, params.features.dtype)
    entry, _ = feats.get_or_compute(
        layout.feature_cache, key, lambda: feats.extract(model, manifest, prep, 64, root=root, progress=False), manifest, {"backbone": params.backbone.name}
    )
    feats.publish_current(entry, layout.features_current)
    fs = feats.load_current(layout.features_current)
    names = class_names(manifest)
    head, _ = train_head(params.head, head_data(fs), len(names), params.seed)
    save_head(layout.head_dir, head, params.head, fs.features.shape[1], names, fs.meta["key"])
    return root


def test_suggest_labels_writes_the_csv_a_person_fills_in_and_the_split_reads_it(trained_project, tmp_path):
    import pandas as pd

    from xfer.config import parse_params
    from xfer.data.split import build_manifest, read_manifest

    out = tmp_path / "labels.csv"
    proc = xfer("suggest-labels", "10", "--root", str(trained_project), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"10 images to label -> {out}" in proc.stdout and f"data.split.target_labels: {out}" in proc.stdout
    got = pd.read_csv(out, dtype=str, keep_default_na=False)
    manifest = read_manifest(trained_project / "data/splits/manifest.csv")
    unlabeled = manifest[(manifest.role == "target") & (manifest.split == "unlabeled")]
    assert list(got.columns) == ["path", "suggested_rank", "predicted", "label"]
    assert got.path.is_unique and set(got.path) <= set(unlabeled.path) and len(got) == 10
    assert got.suggested_rank.tolist() == [str(i) for i in range(1, 11)]
    assert set(got.predicted) <= set(manifest.class_name) and (got.label == "").all()
    # The same project and seed suggest the same images.
    again = tmp_path / "again.csv"
    assert xfer("suggest-labels", "10", "--root", str(trained_project), "--out", str(again)).returncode == 0
    assert again.read_bytes() == out.read_bytes()
    # A person fills it in (here with the true classes); the split takes exactly those rows.
    truth = dict(zip(manifest.path, manifest.class_name))
    got.assign(label=got.path.map(truth)).to_csv(out, index=False)
    params = parse_params({**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "split": {**TINY_PARAMS["data"]["split"], "target_labels": str(out)}}})
    m, _ = build_manifest(trained_project / "data/raw/digits", params.data, params.seed, root=trained_project)
    train = m[(m.role == "target") & (m.split == "train")]
    assert dict(zip(train.path, train.class_name)) == {p: truth[p] for p in got.path}


def test_suggest_labels_defaults_to_labels_csv_in_the_root_and_keeps_a_filled_file(trained_project):
    out = trained_project / "labels.csv"
    try:
        assert xfer("suggest-labels", "3", "--root", str(trained_project)).returncode == 0
        assert len(out.read_text().splitlines()) == 4
        # Unfilled: a new suggestion replaces it. Filled: kept, unless --force.
        assert xfer("suggest-labels", "2", "--root", str(trained_project)).returncode == 0
        lines = out.read_text().splitlines()
        assert len(lines) == 3
        filled = "\n".join([lines[0], lines[1] + "3", lines[2]]) + "\n"
        out.write_text(filled)
        line = one_line_error(xfer("suggest-labels", "2", "--root", str(trained_project)))
        assert f"{out} holds 1 labels: give another --out, or --force to overwrite it; nothing written" in line
        assert out.read_text() == filled
        assert xfer("suggest-labels", "2", "--root", str(trained_project), "--force").returncode == 0
        assert out.read_text() != filled
    finally:
        out.unlink(missing_ok=True)


def test_suggest_labels_refuses_bad_input_and_writes_nothing(trained_project, tmp_path):
    out = tmp_path / "labels.csv"
    # 10 classes x 6 unlabelled target images each in the tiny project.
    line = one_line_error(xfer("suggest-labels", "61", "--root", str(trained_project), "--out", str(out)))
    assert "N 61: the project has 60 unlabelled target images; ask for 1 to 60; nothing written" in line
    line = one_line_error(xfer("suggest-labels", "0", "--root", str(trained_project), "--out", str(out)))
    assert "N 0: ask for at least 1 image" in line
    # A project without a head: the stage to run is named.
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "data").symlink_to(trained_project / "data")
    line = one_line_error(xfer("suggest-labels", "3", "--root", str(headless), "--out", str(out)))
    assert "models/head/head.pt not found (run the head stage); nothing written" in line
    line = one_line_error(xfer("suggest-labels", "3", "--root", str(tmp_path), "--out", str(out)))
    assert "manifest not found" in line and "(run the split stage first)" in line
    (tmp_path / "data" / "splits").mkdir(parents=True)
    (tmp_path / "data" / "splits" / "manifest.csv").write_bytes((trained_project / "data/splits/manifest.csv").read_bytes())
    line = one_line_error(xfer("suggest-labels", "3", "--root", str(tmp_path), "--out", str(out)))
    assert "features/current not found (run the features stage)" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "headless"]


# ---- xfer rank ------------------------------------------------------------------------


def test_rank_scores_each_candidate_recommends_by_its_rule_and_caches_the_features(trained_project):
    """The main backbone's features are a cache hit; another candidate's are computed into the
    cache under the key the features stage would use for it, so picking it costs no extraction."""
    from xfer import features as feats
    from xfer.backbones import create_backbone
    from xfer.config import BackboneConfig, parse_params
    from xfer.data.split import read_manifest
    from xfer.layout import Layout

    params = json.loads(json.dumps(TINY_PARAMS))
    other = {"name": "test_resnet", "pretrained": False, "image_size": 32}
    params["rank"] = {"backbones": [params["backbone"], other]}
    write_params(trained_project, params)
    layout = Layout(trained_project)
    try:
        proc = xfer("rank", "--root", str(trained_project))
        result = json.loads((trained_project / "metrics/rank.json").read_text())
        again = xfer("rank", "--root", str(trained_project))
    finally:
        write_params(trained_project, TINY_PARAMS)
    assert proc.returncode == 0, proc.stderr
    rows = {row["candidate"]: row for row in result["backbones"]}
    assert list(rows) == ["test_efficientnet 32px random init", "test_resnet 32px random init"]
    assert all(set(result["scores"]) <= set(row) for row in rows.values()) and result["scores"] == ["logme", "hscore", "knn", "domain_gap"]
    assert rows["test_efficientnet 32px random init"]["cache_hit"] and not rows["test_resnet 32px random init"]["cache_hit"]
    best = max(rows.values(), key=lambda row: row["logme"])["candidate"]
    assert result["recommended"] == best and f"recommended: {best}" in proc.stdout and "highest LogME" in result["rule"]
    assert (trained_project / "plots/rank/rank.png").stat().st_size > 1000
    # The features stage would find test_resnet's entry: same key, whole, verified.
    manifest = read_manifest(layout.manifest)
    model, prep, weights = create_backbone(BackboneConfig(**other), num_classes=0)
    key = feats.cache_key("test_resnet", weights.digest, prep, manifest, parse_params(params).features.dtype)
    assert feats.load_entry(feats.entry_dir(layout.feature_cache, key)).features.shape == (len(manifest), model.num_features)
    assert again.returncode == 0 and "computed" not in again.stdout.split("recommended:")[0], again.stdout


def test_rank_by_default_scores_the_offline_pretrained_backbones_and_a_random_control(trained_project):
    """rank.backbones empty: lite0, lite1 and lite2 with their shipped ImageNet weights, and lite0
    with random weights, at backbone.image_size; offline (no hub cache is read)."""
    proc = xfer("rank", "--root", str(trained_project))
    assert proc.returncode == 0, proc.stderr
    size = TINY_PARAMS["backbone"]["image_size"]
    names = [row["candidate"] for row in json.loads((trained_project / "metrics/rank.json").read_text())["backbones"]]
    expected = [f"tf_efficientnet_lite{n} {size}px pretrained" for n in (0, 1, 2)] + [f"tf_efficientnet_lite0 {size}px random init"]
    assert names == expected
    assert all(name in proc.stdout for name in expected)


def test_rank_without_a_manifest_says_what_to_run_and_writes_nothing(tmp_path):
    write_params(tmp_path, TINY_PARAMS)
    line = one_line_error(xfer("rank", "--root", str(tmp_path)))
    assert "manifest.csv not found: run the split stage first" in line and "nothing written" in line
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "plots").exists()
