"""The README's figures are the files the scripts wrote, and a fresh default run reproduces them
as the README says: some outputs bit for bit, the trained models' figures within a stated tolerance."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from default_run import METRICS, ONEDNN_ISA, TOLERANCE  # noqa: E402

COMMITTED = json.loads((REPO / "benchmarks" / "results" / "default_run.json").read_text())


def test_committed_default_run_states_the_tolerance_the_tests_use():
    assert COMMITTED["tolerance"] == TOLERANCE
    assert set(COMMITTED["eval"]) == set(TOLERANCE), "every model of the table needs a tolerance"
    # The tolerance is above what was measured between two CPU kinds, with room to spare
    # (when the committed run has such a measurement: the current default's is not made yet).
    for model, measured in COMMITTED.get("other_cpu", {}).get("largest_difference", {}).items():
        assert measured < TOLERANCE[model], (model, measured)


@pytest.mark.slow
def test_a_default_run_reproduces_the_committed_one(tmp_path):
    """Bit for bit: the manifest and the features. Within TOLERANCE: every figure of every model.

    benchmarks/default_run.py itself runs the chain, in a process of its own: it holds oneDNN to
    ONEDNN_ISA before any convolution runs there (this process may have run some already, which
    fixes oneDNN's kernels for its lifetime), so the features are the committed bytes on any CPU."""
    out = tmp_path / "run.json"
    script = REPO / "benchmarks" / "default_run.py"
    # As `make run` runs it: with the CPU's own thread count, not the one thread `make test` gives
    # its tiny-tensor tests (here one thread took 8 min 29 s against about 7 min).
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, str(script), "--root", str(tmp_path / "root"), "--out-json", str(out)], cwd=REPO, env=env, check=True, timeout=1800)
    run = json.loads(out.read_text())
    assert run["machine"]["onednn_max_cpu_isa"] == ONEDNN_ISA
    assert run["exact"] == COMMITTED["exact"]
    results = run["eval"]
    assert {(m, s) for m, by in results.items() for s in by} == {(m, s) for m, by in COMMITTED["eval"].items() for s in by}
    for model, by_split in COMMITTED["eval"].items():
        for split, figures in by_split.items():
            got = [results[model][split][k] for k in METRICS]
            assert [figures[k] for k in METRICS] == pytest.approx(got, abs=TOLERANCE[model]), (model, split)


@pytest.mark.parametrize(
    "name",
    [
        "default_run",
        "startup",
        "adaptation",
        "selection",
        "selection_linear",
        "rank",
        "finetune_shifts",
        "suggest_labels",
        "head_search",
        "imbalance",
        "importance",
        "translate",
        "features",
        "features_photos",
        "finetune",
        "finetune_throughput",
        "faults",
        "drift",
        "e2e",
    ],
)
def test_readme_benchmark_tables_are_the_ones_the_scripts_wrote(name):
    """benchmarks/<name>.py writes results/<name>.md; the README shows that file, unedited."""
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert block, f"README lacks the {name} benchmark table"
    assert block.group(1) == (REPO / "benchmarks" / "results" / f"{name}.md").read_text()
    written = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
    assert written, f"results/{name}.json is empty"


def test_the_selection_benchmark_covers_six_shifts_and_the_shipped_rule():
    """results/selection.json: at least six tasks (the default as `digits`), three seeds, each task's
    pick / source_only / oracle; and the pick is the rule params.yaml ships, not a target-test choice."""
    import yaml

    result = json.loads((REPO / "benchmarks" / "results" / "selection.json").read_text())
    tasks = result["tasks"]
    assert len(tasks) >= 6 and "digits" in tasks and len(result["meta"]["seeds"]) >= 3
    for name, task in tasks.items():
        assert {"pick", "source_only", "oracle"} <= set(task), name
        assert len(task["per_seed"]) == len(result["meta"]["seeds"]), name
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["head"]["selection"] != "target_val" and params["finetune"].get("selection") != "target_val"
    assert result["meta"]["head"]["selection"] == params["head"]["selection"]


def test_render_with_another_cpus_run_writes_the_differences_into_both_files(tmp_path, monkeypatch):
    """`default_run.py --render --other F`: the committed .json gains other_cpu (the largest difference
    per model, F's machine) and the .md its table; nothing is trained."""
    import default_run

    committed = json.loads((REPO / "benchmarks" / "results" / "default_run.json").read_text())
    committed.pop("other_cpu", None)
    other = json.loads(json.dumps(committed))
    other["machine"] = {"cpu": "Another CPU", "cpu_capability": "AVX512", "onednn_max_cpu_isa": "AVX2"}
    other["eval"]["finetune"]["target_test"]["accuracy"] -= 0.05
    other["eval"]["fusion"]["target_val"]["macro_f1"] += 0.02
    monkeypatch.setattr(default_run, "RESULTS", tmp_path)
    (tmp_path / "default_run.json").write_text(json.dumps(committed))
    (tmp_path / "other.json").write_text(json.dumps(other))

    assert default_run.main(["--render", "--other", str(tmp_path / "other.json")]) == 0
    written = json.loads((tmp_path / "default_run.json").read_text())
    assert written["other_cpu"]["machine"]["cpu"] == "Another CPU"
    assert written["other_cpu"]["largest_difference"] == pytest.approx({"finetune": 0.05, "fusion": 0.02, "head": 0.0})
    assert written["eval"] == committed["eval"], "the committed figures stay the committed run's"
    md = (tmp_path / "default_run.md").read_text()
    assert "on Another CPU (its kernels: AVX512, oneDNN held to AVX2)" in md
    assert "| finetune | 0.050 | 0.12 |" in md and "| head | 0.000 | 0.12 |" in md
    assert "Not yet measured" not in md


def test_a_run_on_the_cpus_own_onednn_kernels_is_named_so_and_only_written_as_a_run_to_compare():
    """--onednn-isa native measures another kernel set on the same machine; the committed run stays held."""
    import default_run

    assert default_run.onednn_setting({"onednn_max_cpu_isa": "not set"}) == "oneDNN on its own kernels for this CPU"
    assert default_run.onednn_setting({"onednn_max_cpu_isa": "AVX2"}) == "oneDNN held to AVX2"
    here = {"cpu": "AMD EPYC", "cpu_capability": "AVX512"}
    assert default_run.where(here, dict(here)) == "on the same CPU kind (AMD EPYC), another kernel setting"
    assert default_run.where(here, here | {"cpu_capability": "AVX2"}) == "on AMD EPYC"
    with pytest.raises(SystemExit):
        default_run.main(["--onednn-isa", "native"])  # would overwrite the committed run: refused before any work
