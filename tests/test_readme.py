"""The README's figures are the ones the default pipeline produces."""

import json
import re
import shutil

import pytest

from helpers import REPO


def readme_table() -> dict[tuple[str, str], list[float]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- eval:begin -->\s*```text\n(.*?)```\s*<!-- eval:end -->", text, re.S)
    assert block, "README lacks the eval table"
    rows = {}
    for line in block.group(1).strip().splitlines()[1:]:
        model, split, *values = line.split()
        rows[(model, split)] = [float(v) for v in values]
    return rows


@pytest.mark.slow
def test_readme_figures_match_a_default_run(tmp_path, prefect_api):
    from flows.pipeline import pipeline

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    pipeline(root=str(tmp_path))
    results = json.loads((tmp_path / "metrics/eval.json").read_text())
    table = readme_table()
    assert set(table) == {(m, s) for m, by in results.items() for s in by}
    for (model, split), values in table.items():
        got = results[model][split]
        measured = [got[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")]
        # Three decimals, as printed; a little slack for BLAS differences between CPUs.
        assert values == pytest.approx(measured, abs=0.006), (model, split)


@pytest.mark.parametrize("name", ["adaptation", "features", "finetune", "finetune_throughput"])
def test_readme_benchmark_tables_are_the_ones_the_scripts_wrote(name):
    """benchmarks/<name>.py writes results/<name>.md; the README shows that file, unedited."""
    text = (REPO / "README.md").read_text()
    block = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert block, f"README lacks the {name} benchmark table"
    assert block.group(1) == (REPO / "benchmarks" / "results" / f"{name}.md").read_text()
    written = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
    assert written, f"results/{name}.json is empty"
