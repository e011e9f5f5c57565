"""benchmarks/finetune_shifts.py: which epoch each finetune.selection rule keeps, and the table it writes."""

from __future__ import annotations

import sys

from helpers import REPO

sys.path.insert(0, str(REPO))
from benchmarks.finetune_shifts import EPOCH_RULES, epoch_picks, markdown  # noqa: E402


def history(target_val: list[float], info_max: list[float]) -> list[dict[str, float]]:
    """Epoch records as fine-tuning writes them (epoch 0, the probe, first); other validators flat."""
    out = []
    for tv, im in zip(target_val, info_max):
        rec = {"source_val_accuracy": 0.99, "target_val_accuracy": tv}
        rec |= {f"validator_{r}": 0.0 for r in EPOCH_RULES if r not in ("last", "source_val")}
        rec["validator_info_max"] = im
        out.append(rec)
    return out


def test_each_rule_is_scored_by_the_target_val_accuracy_of_the_epoch_it_keeps():
    picks = epoch_picks(history([0.5, 0.8, 0.7, 0.6], [0.1, 0.3, 0.9, 0.2]))
    assert picks["last"] == 0.6
    assert picks["info_max"] == 0.7  # its best epoch is the third
    assert picks["source_val"] == 0.6  # flat: ties go to the later epoch
    assert picks["oracle"] == 0.8
    assert "ensv" not in picks  # fine-tuning cannot take it


def test_the_table_gives_the_fine_tuned_gain_over_the_head_per_task_and_on_average():
    row = {"source_only": 0.5, "head": 0.7, "head_kept": "mcc(mcc_temperature=2.5)", "finetune": 0.8, "seconds": 1.0}
    row["epochs"] = dict.fromkeys([*EPOCH_RULES, "oracle"], 0.75)
    other = row | {"head": 0.6, "finetune": 0.5}
    meta = {
        "seeds": [0],
        "head": {"method": "auto", "selection": "soft_info_max"},
        "finetune": {"strategy": "lp_ft", "epochs": 8, "schedule": "cosine", "method": "auto"},
        "machine": "m",
        "seconds": 2.0,
    }
    text = markdown({"meta": meta, "tasks": {"printed_to_noisy": {"per_seed": {"0": other}}, "digits": {"per_seed": {"0": row}}}})
    lines = text.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("| digits |"))) < lines.index(next(x for x in lines if x.startswith("| printed_to_noisy |")))
    assert "| digits | 0.500 | 0.700 | 0.800 | +0.100 | +0.300 | mcc(mcc_temperature=2.5) |" in lines
    assert "| printed_to_noisy | 0.500 | 0.600 | 0.500 | -0.100 | +0.000 | mcc(mcc_temperature=2.5) |" in lines
    assert "| **mean** | 0.500 | 0.650 | 0.650 | +0.000 | +0.150 | |" in lines
