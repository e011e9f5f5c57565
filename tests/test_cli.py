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
    "stage": ["usage: xfer stage", "STAGE", "--root", "fetch, split, features, head, finetune, evaluate"],
    "pipeline": ["usage: xfer pipeline", "--root"],
    "summary": ["usage: xfer summary", "EVAL_JSON"],
    "predict": ["usage: xfer predict", "IMAGE_OR_FOLDER", "--model", "--out", "--tracking-uri", "--batch-size"],
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
        assert f"\n    {command} " in proc.stdout, command


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
        (["nope"], "invalid choice: 'nope' (choose from 'validate', 'stage', 'pipeline', 'summary', 'predict', 'cache')"),
        (["stage", "fech"], "invalid choice: 'fech' (choose from 'fetch', 'split', 'features', 'head', 'finetune', 'evaluate')"),
        (["stage"], "the following arguments are required: STAGE"),
        (["predict"], "the following arguments are required: IMAGE_OR_FOLDER"),
        (["predict", "a.png", "--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
        (["summary", "a.json", "b.json"], "unrecognized arguments: b.json"),
        (["--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_arguments_give_one_line_naming_them_and_exit_2(args, expected):
    line = one_line_error(xfer(*args))
    assert line.startswith("xfer") and expected in line, line


def test_stage_names_are_the_flows():
    from cli.main import STAGE_NAMES
    from flows.stages import STAGE_FLOWS

    assert STAGE_NAMES == tuple(STAGE_FLOWS)


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
    figures = {"accuracy": 0.875, "macro_precision": 0.5, "macro_recall": 0.25, "macro_f1": 0.125}
    (tmp_path / "eval.json").write_text(json.dumps({"head": {"target_test": figures}}))
    proc = xfer("summary", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.strip().splitlines()[-1].split()
    assert row == ["head", "target_test", "0.875", "0.500", "0.250", "0.125"], proc.stdout
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
