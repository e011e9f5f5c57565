"""docs/security.md against the code, and the kill campaign (benchmarks/faults.py) on one stage."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import REPO

DOC = REPO / "docs" / "security.md"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bind_table() -> dict[str, str]:
    """docs/security.md's bind table: server -> its "listens on" cell."""
    text = DOC.read_text()
    section = text.split("## Which servers bind where", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("server", "---"):
            rows[cells[0]] = cells[2]
    return rows


def loopback_only(cell: str) -> bool:
    return cell.startswith("127.0.0.1 only") and "0.0.0.0" not in cell and "`::`" not in cell


def test_every_server_the_project_starts_has_a_row():
    rows = bind_table()
    assert set(rows) == {
        "MLflow UI",
        "Prefect server",
        "MLflow server",
        "deployments runner",
        "Prefect's temporary server",
        "a stage's temporary Prefect server",
        "model server",
        "torchrun's rendezvous",
        "local Dask cluster",
        "local Ray instance",
    }


def test_loopback_claims_match_the_commands_the_code_runs():
    """Each server the page calls loopback-only is started with 127.0.0.1 by the code, the Makefile or the library default."""
    rows = bind_table()
    import servers.supervisor as supervisor

    assert supervisor.HOST == "127.0.0.1" and f'`HOST = "{supervisor.HOST}"`' in DOC.read_text()
    assert loopback_only(rows["Prefect server"]) and loopback_only(rows["MLflow server"])
    runner = supervisor.flows_server(Path("/project"), 4280, 4200)
    assert runner.env["PREFECT_RUNNER_SERVER_HOST"] == supervisor.HOST and loopback_only(rows["deployments runner"])

    make_ui = re.search(r"^ui:.*\n\t(.*)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert "--host 127.0.0.1" in make_ui and loopback_only(rows["MLflow UI"])

    # The libraries' own source, read as text (importing them costs seconds): Prefect's temporary
    # server passes --host 127.0.0.1 to uvicorn; `mlflow models serve`'s --host defaults to it.
    prefect_server = Path(importlib.util.find_spec("prefect.server.api.server").origin).read_text()
    uvicorn_command = prefect_server[prefect_server.index("def _run_uvicorn_command") :][:2000]
    assert re.search(r'"--host",\s*"127\.0\.0\.1"', uvicorn_command)
    assert loopback_only(rows["Prefect's temporary server"]) and loopback_only(rows["a stage's temporary Prefect server"])
    cli_args = Path(importlib.util.find_spec("mlflow.utils.cli_args").origin).read_text()
    assert re.search(r'HOST = click\.option\(\s*"--host",[^)]*default="127\.0\.0\.1"', cli_args)
    readme_serve = re.search(r"mlflow models serve \\\n(.*)\n", (REPO / "README.md").read_text()).group(1)
    assert "--host 127.0.0.1" in readme_serve and loopback_only(rows["model server"])


def test_runner_addresses_match_the_page():
    """tasks/runners.py's local clusters are started as the page says: Dask with a loopback host; Ray with
    a loopback node address and its cluster switch off while the shards run (else Ray binds all interfaces)."""
    from tasks.runners import shard_runner, task_runner
    from xfer.config import RunnerConfig

    rows = bind_table()
    dask = task_runner(RunnerConfig(kind="dask", workers=1))
    assert dask.cluster_kwargs["host"] == "127.0.0.1" and dask.cluster_kwargs["dashboard_address"] is None
    assert loopback_only(rows["local Dask cluster"]) and "127.0.0.1:8787" in rows["local Dask cluster"]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    with shard_runner(RunnerConfig(kind="ray", workers=1)) as ray:
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        import ray._private.ray_constants as ray_constants

        assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ, "the stage's environment is as it was"
    assert ray.init_kwargs["_node_ip_address"] == "127.0.0.1" and ray.init_kwargs["include_dashboard"] is False
    assert loopback_only(rows["local Ray instance"]) and "`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`" in DOC.read_text()


def test_torchrun_row_follows_the_launch_command():
    """The page says `::` while tasks/finetune.py launches torchrun with no loopback endpoint,
    and 127.0.0.1 once it passes one: a fix that lands must update the page."""
    # The list launch_workers builds, read from its source (importing tasks.finetune costs seconds).
    tree = ast.parse((REPO / "tasks" / "finetune.py").read_text())
    launch = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "launch_workers")
    command = next(n.value for n in ast.walk(launch) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "command")
    words = [ast.unparse(e) for e in command.elts]
    launcher = words[: words.index("'xfer.finetune_job'")]
    cell = bind_table()["torchrun's rendezvous"]
    if any("127.0.0.1" in arg or "localhost" in arg for arg in launcher):
        assert loopback_only(cell), cell
    else:
        assert "'--standalone'" in launcher and "**`::` (all interfaces)" in cell


# -- the kill campaign -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults():
    return _load("faults")


def test_campaign_checker_finds_each_kind_of_damage(faults, tmp_path):
    """check_outputs, on a real split output: equal passes; a changed byte, a truncated json,
    a leftover temporary file and a missing file each fail, by name."""
    ref, now = tmp_path / "ref", tmp_path / "now"
    (ref / "data" / "splits").mkdir(parents=True)
    (ref / "data" / "splits" / "manifest.csv").write_text("path,label\na.png,0\nb.png,1\n")
    (ref / "data" / "splits" / "report.json").write_text(json.dumps({"rows": 2, "acc": 0.5}))
    reference = faults.snapshot(ref, "split")
    assert sorted(reference) == ["data/splits/manifest.csv", "data/splits/report.json"]

    def damaged(change) -> list[str]:
        shutil.rmtree(now, ignore_errors=True)
        shutil.copytree(ref, now)
        change(now / "data" / "splits")
        return faults.check_outputs(now, ref, "split", reference)[0]

    assert damaged(lambda d: None) == []
    assert damaged(lambda d: (d / "manifest.csv").write_text("path,label\na.png,0\nb.png,2\n")) == ["bytes differ: data/splits/manifest.csv"]
    truncated = damaged(lambda d: (d / "report.json").write_text('{"rows": 2, "ac'))
    assert len(truncated) == 1 and truncated[0].startswith("does not load: data/splits/report.json (JSONDecodeError")
    assert damaged(lambda d: (d / ".report.json.x1y2.tmp").write_text("")) == ["extra data/splits/.report.json.x1y2.tmp"]
    assert damaged(lambda d: (d / "report.json").unlink()) == ["missing data/splits/report.json"]
    # A training stage may differ in the last bits: within tolerance it passes, beyond it does not.
    assert faults.close({"acc": [0.5, 1.0]}, {"acc": [0.5 + 1e-12, 1.0]})
    assert not faults.close({"acc": [0.5, 1.0]}, {"acc": [0.51, 1.0]})


def test_a_stopped_campaign_writes_its_finished_stages_and_says_it_is_partial(faults, tmp_path):
    """The results file is written after each stage's rounds: a campaign stopped early leaves a file
    that holds the finished stages and names the ones it never reached; a finished one says nothing of the kind."""
    import argparse

    args = argparse.Namespace(kills=3, seed=0, origin="flow")
    row = {"kills": 3, "killed_mid_run": 3, "killed_in_flow": 3, "survived": 3, "byte_equal": 3, "failures": [], "mlflow_running_after": 0}
    partial = {"walls_s": {"fetch": 1.0, "split": 2.0}, "flow_s": {"fetch": 0.5, "split": 1.0}, "origin": "flow",
               "rows": {"fetch": row}, "stages": ["fetch", "split"], "campaign_s": 9.0}  # fmt: skip
    faults.write_results(partial, args, tmp_path)
    text = (tmp_path / "faults.md").read_text()
    assert "**Partial**: the campaign was stopped before it reached split." in text and "| fetch | 3 | 3 | 3 | 3 | 3 | 0 | - |" in text
    assert json.loads((tmp_path / "faults.json").read_text())["rows"].keys() == {"fetch"}
    faults.write_results({**partial, "rows": {"fetch": row, "split": row}}, args, tmp_path)
    assert "Partial" not in (tmp_path / "faults.md").read_text()


def test_the_campaign_finds_a_temporary_left_anywhere_in_the_projects_working_folders(faults, tmp_path):
    """A killed write outside the stage's outputs (a checkpoint, the feature cache, fetch's staging
    under data/downloads) is a leftover too; locks and the user's own dot files are not."""
    for keep in ("data/feature-cache/.in-use.lock", "data/feature-cache/k.lock", "data/raw/.gitignore", "plots/head/notes.tmp"):
        (tmp_path / keep).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / keep).write_text("")
    assert faults.stray_temporaries(tmp_path) == []
    stray = ["checkpoints/finetune/.last.pt.ab12cd34.tmp", "data/feature-cache/.k.zz9yy8xx.tmp", "data/downloads/.staging-host-12-34-abcdefgh"]
    for rel in stray:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "half").write_text("")  # a folder's contents are not listed again
    assert faults.stray_temporaries(tmp_path) == sorted(stray)


def test_one_kill_of_the_fetch_stage_survives_in_a_real_campaign(tmp_path):
    """benchmarks/faults.py itself, cut to one stage and one kill: the uninterrupted fetch, a fetch
    SIGKILLed at a seeded point of its flow, the rerun, and the checks (outputs equal to the byte,
    no leftover anywhere, no MLflow run left RUNNING)."""
    import subprocess
    import sys

    command = [sys.executable, "benchmarks/faults.py", "--kills", "1", "--stages", "fetch", "--from", "flow", "--seed", "0", "--no-write"]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "XFER_TRACKING_URI", "XFER_PIPELINE_RUN_ID")}
    proc = subprocess.run(command, cwd=REPO, env={**env, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    [row] = [line.split() for line in proc.stdout.splitlines() if line.startswith("fetch ")]
    kills, mid_run, in_flow, survived, byte_equal = map(int, row[1:6])
    assert (kills, survived, byte_equal) == (1, 1, 1) and row[6] == "-", proc.stdout
    assert "kill 1/1 at" in proc.stderr and list(tmp_path.iterdir()) == [], "the campaign removed its scratch folder"
