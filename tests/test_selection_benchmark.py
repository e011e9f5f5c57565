"""benchmarks/selection.py's reference comparison: xfer's head on the reference's step budget, gaps paired by seed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers import REPO
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(REPO))
from benchmarks.selection import epochs_for_steps, paired_gap  # noqa: E402
from xfer.config import HeadConfig  # noqa: E402
from xfer.heads import HeadData, head_epochs  # noqa: E402


@pytest.mark.parametrize(("rows", "batch", "steps", "epochs"), [(1540, 32, 1500, 31), (1259, 32, 1500, 38), (64, 32, 1500, 750), (10, 32, 3, 3)])
def test_epochs_for_steps_is_the_fewest_that_reach_the_budget(rows, batch, steps, epochs):
    assert epochs_for_steps(rows, batch, steps) == epochs


def test_a_head_trained_for_those_epochs_takes_at_least_the_reference_steps_and_one_epoch_fewer_does_not():
    """Counted on xfer's own training loop, by a global optimizer step hook."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(100, 4)).astype(np.float32), rng.integers(0, 2, 100)
    data = HeadData(source_train=(x, y), source_val=(x[:10], y[:10]))
    budget = 20
    epochs = epochs_for_steps(len(x), 32, budget)

    def steps(n_epochs: int) -> int:
        cfg = HeadConfig(
            kind="linear",
            method="source_only",
            feature_norm="none",
            epochs=n_epochs,
            batch_size=32,
            optimizer="sgd",
            lr_schedule="inverse_decay",
            selection="last",
        )
        calls = 0

        def count(*_):
            nonlocal calls
            calls += 1

        hook = register_optimizer_step_post_hook(count)
        try:
            for _ in head_epochs(cfg, data, 2, seed=0):
                pass
        finally:
            hook.remove()
        return calls

    assert steps(epochs) >= budget > steps(epochs - 1)


def test_paired_gap_is_the_mean_seed_difference_and_its_standard_error():
    per_seed = {"0": {"xfer_mcc": 0.70, "reference_mcc": 0.72}, "1": {"xfer_mcc": 0.75, "reference_mcc": 0.74}, "2": {"xfer_mcc": 0.80, "reference_mcc": 0.78}}
    gap, se = paired_gap({"per_seed": per_seed}, "xfer_mcc", "reference_mcc")
    diffs = np.array([-0.02, 0.01, 0.02])
    assert gap == pytest.approx(diffs.mean())
    assert se == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))


def constructed_result(xfer_rows: str | None, **head) -> dict:
    """One task, two seeds: what benchmarks/selection.py writes, with numbers chosen here."""
    from xfer.config import VALIDATOR_NAMES

    seeds = {
        str(s): {
            "xfer_dann": 0.60 + s / 100,
            "reference_dann": 0.61,
            "xfer_cdan": 0.70,
            "reference_cdan": 0.69,
            "xfer_mcc": 0.80,
            "reference_mcc": 0.80 - s / 50,
            "source_only": 0.49 + s / 50,
            "logistic_regression": 0.51,
        }
        for s in (0, 1)
    }
    validator = {"kept": 0.7, "raw": 0.7, "fell_back": 0.0, "spearman": 0.5}
    task = {
        "default": 0.7,
        "oracle": 0.8,
        "validators": dict.fromkeys(VALIDATOR_NAMES, validator),
        "per_seed": seeds,
    }
    task |= {k: float(np.mean([r[k] for r in seeds.values()])) for k in seeds["0"]}
    meta = {"backbone": "b", "seeds": [0, 1], "candidates": 7, "head": HeadConfig().model_dump() | head, "machine": "m", "seconds": 1.0}
    if xfer_rows is not None:
        meta["xfer_rows"] = xfer_rows
    return {"meta": meta, "tasks": {"digits": task}}


def test_the_reference_table_shows_xfer_rows_with_their_paired_gap_only_when_written_under_the_current_definition():
    from benchmarks.selection import XFER_ROWS, markdown

    row = next(line for line in markdown(constructed_result(XFER_ROWS)).splitlines() if line.startswith("| digits | 0.500 | 0.510 |"))
    # source-only 0.50 (0.49, 0.51) vs 0.51: -0.010 ± 0.010; dann: xfer 0.605 (0.60, 0.61) vs 0.61: -0.005 ± 0.005;
    # mcc: 0.80 vs 0.79: +0.010 ± 0.010.
    assert row.startswith("| digits | 0.500 | 0.510 | -0.010 ± 0.010 |"), row
    assert "| 0.605 | 0.610 | -0.005 ± 0.005 |" in row and "| 0.800 | 0.790 | +0.010 ± 0.010 |" in row, row

    old = markdown(constructed_result(None))
    row = next(line for line in old.splitlines() if line.startswith("| digits | 0.500 | 0.510 |"))
    assert "0.605" not in row and "| - | 0.610 | - |" in row and "| -0.010 ± 0.010 |" in row, row
    assert "written before xfer's rows took the reference's terms" in old


def test_rows_a_head_section_refuses_render_as_not_applicable():
    """A linear head has no hidden features for DANN or CDAN to align: params.yaml refuses those
    methods on it, so their xfer cells say so instead of showing a head that did not adapt."""
    from benchmarks.selection import XFER_ROWS, markdown, xfer_method_config

    assert xfer_method_config(HeadConfig().model_dump() | {"kind": "linear"}, "dann") is None
    assert xfer_method_config(HeadConfig().model_dump() | {"kind": "linear"}, "mcc").method == "mcc"
    assert xfer_method_config(HeadConfig().model_dump(), "cdan", epochs=31).epochs == 31
    text = markdown(constructed_result(XFER_ROWS, kind="linear"))
    row = next(line for line in text.splitlines() if line.startswith("| digits | 0.500 | 0.510 |"))
    assert "| n/a | 0.610 | n/a | n/a | 0.690 | n/a | 0.800 | 0.790 | +0.010 ± 0.010 |" in row, row
    assert "refuses head.method dann and cdan: method 'dann' aligns the head's hidden features, which a linear head lacks; method 'cdan'" in text


def test_leave_one_task_out_chooses_each_temperature_on_the_other_tasks_only():
    """Task c alone would choose T=2; held out, it gets the T the others choose (1) and its own accuracy there."""
    from benchmarks.soft_temperature import leave_one_task_out

    acc = {"a": {1.0: 0.6, 2.0: 0.5}, "b": {1.0: 0.7, 2.0: 0.7}, "c": {1.0: 0.1, 2.0: 0.9}}
    loo = leave_one_task_out(acc)
    assert loo["c"] == {"chosen": 1.0, "held_out": 0.1}
    assert loo["a"] == {"chosen": 2.0, "held_out": 0.5}  # b and c: 0.4 at T=1, 0.8 at T=2
    assert loo["b"] == {"chosen": 2.0, "held_out": 0.7}  # a and c: 0.35 against 0.7


def test_the_temperature_pick_takes_each_candidates_best_epoch_then_the_best_candidate():
    from benchmarks.soft_temperature import pick

    def rows(margin, n=50, classes=4):
        logits = np.zeros((n, classes))
        logits[np.arange(n), np.arange(n) % classes] = margin
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    # Candidate 0's best epoch is its first (margin 6); candidate 1 reaches margin 8 at its second
    # epoch and keeps it at the third: ties go to the later epoch.
    targets = [[rows(6), rows(3)], [rows(2), rows(8), rows(8)]]
    assert pick(targets, 1.0) == (1, 2)
    assert pick([[rows(5)], [rows(5)]], 2.0) == (0, 0)  # a tie between candidates goes to the earlier


def test_the_temperature_table_names_what_the_other_tasks_choose():
    from benchmarks.soft_temperature import markdown

    tasks = {"a": {"1.0": 0.6, "2.0": 0.5}, "b": {"1.0": 0.7, "2.0": 0.7}, "c": {"1.0": 0.1, "2.0": 0.9}}
    rows = {line.split(" | ")[0].strip("| *"): line for line in markdown(tasks) if line.startswith("| ")}
    assert rows["c"].endswith("| 1 | 0.100 |") and rows["a"].endswith("| 2 | 0.500 |")
    assert rows["mean"].endswith("| | 0.433 |")  # (0.5 + 0.7 + 0.1) / 3
    assert any("Chosen on all 3 tasks together: T = 2" in line for line in markdown(tasks))


def test_results_written_before_a_validator_existed_render_it_as_missing():
    """--render on an older .json (no soft_info_max figures): a `-` column and a line saying why, not a KeyError."""
    from benchmarks.selection import XFER_ROWS, markdown

    result = constructed_result(XFER_ROWS)
    del result["tasks"]["digits"]["validators"]["soft_info_max"]
    text = markdown(result)
    header = next(line for line in text.splitlines() if line.startswith("| task | source-only | default |"))
    row = next(line for line in text.splitlines() if line.startswith("| digits | 0.500 | 0.700 |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[cols.index("soft_info_max")] == "-" and cells[cols.index("info_max")] == "0.700"
    assert "soft_info_max came after these results were written" in text
    assert "| soft_info_max |" not in text.split("Negative transfer")[1].split("Reference rows")[0]


def test_the_source_only_regulariser_is_chosen_on_the_other_tasks_only():
    """Task c alone would choose label smoothing; held out, it gets what a and b choose (none, the earlier
    variant on a tie) and its own gap there. Gaps are to logistic regression, paired by seed (dyadic
    figures, so the tie is exact)."""
    from benchmarks.source_only import summarise

    a, b, c = "none", "label_smoothing 0.1", "weight_decay 0.01"
    accuracy = {
        "a": {a: [0.5, 0.75], b: [0.5, 0.625], c: [0.25, 0.25]},
        "b": {a: [0.5, 0.5], b: [0.5625, 0.5625], c: [0.25, 0.25]},
        "c": {a: [0.125, 0.125], b: [0.75, 0.75], c: [0.5, 0.5]},
    }
    result = summarise(accuracy, {"a": 0.5, "b": 0.5, "c": 0.25})
    row = result["tasks"]["a"]["variants"][a]
    assert row["gap"] == 0.125 and row["se"] == pytest.approx(0.125)  # gaps 0 and 0.25
    loo = result["leave_one_task_out"]
    assert loo["c"] == {"chosen": a, "held_out_gap": -0.125}  # a and b: 0.0625 both over tasks a, b
    assert loo["a"] == {"chosen": b, "held_out_gap": 0.0625}
    assert loo["b"]["chosen"] == b
    assert result["chosen_on_all"] == b


def test_the_source_only_benchmarks_column_of_the_selection_benchmarks_head_is_its_source_only_row():
    """Both committed files train the same head (params.yaml's, source_only, its epoch by source val) on the
    same features and seeds: the column of benchmarks/source_only.py whose only setting is the label smoothing
    that selection.py's head gave its source-only candidate is selection.py's source-only column, and its
    logistic regression is the same figure, task by task."""
    results = REPO / "benchmarks" / "results"
    regularisers = json.loads((results / "source_only.json").read_text())
    selection = json.loads((results / "selection.json").read_text())
    assert regularisers["meta"]["seeds"] == selection["meta"]["seeds"]
    assert set(regularisers["tasks"]) == set(selection["tasks"])
    smoothing = HeadConfig(**selection["meta"]["head"]).model_copy(update={"method": "source_only"}).effective_label_smoothing
    (column,) = [v for v, setting in regularisers["meta"]["variants"].items() if setting == {"source_only_label_smoothing": smoothing}]
    for name, row in regularisers["tasks"].items():
        assert row["variants"][column]["accuracy"] == pytest.approx(selection["tasks"][name]["source_only"], abs=1e-9), name
        assert row["logistic_regression"] == pytest.approx(selection["tasks"][name]["logistic_regression"], abs=1e-9), name
