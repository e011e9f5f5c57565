"""benchmarks/rank.py: the table it writes from each task's scores and head accuracies."""

from __future__ import annotations

import sys

from helpers import REPO

sys.path.insert(0, str(REPO))
from benchmarks.rank import markdown  # noqa: E402


def task(logme: list[float], accuracy: list[float], recommended: int, best: int) -> dict:
    names = ["a", "b", "c"]
    rows = [
        {"candidate": n, "logme": lm, "hscore": 1.0, "knn": 0.5, "domain_gap": -1.0, "head_target_test_accuracy": acc}
        for n, lm, acc in zip(names, logme, accuracy)
    ]
    return {
        "rows": rows,
        "spearman": {"logme": 1.0, "hscore": 0.0, "knn": 0.0, "domain_gap": -0.5},
        "recommended": names[recommended],
        "recommended_accuracy": accuracy[recommended],
        "best": names[best],
        "best_accuracy": accuracy[best],
    }


def test_the_table_has_a_row_per_task_their_mean_and_every_candidate():
    result = {
        "meta": {"command": "python benchmarks/rank.py", "machine": "m", "seed": 0, "head": {"method": "auto", "selection": "soft_info_max"}},
        "backbones": ["a", "b", "c"],
        "tasks": {"t1": task([0.1, 0.3, 0.2], [0.5, 0.9, 0.7], 1, 1), "t2": task([0.3, 0.1, 0.2], [0.6, 0.8, 0.7], 0, 1)},
    }
    text = markdown(result)
    assert "| t1 | +1.00 | +0.00 | +0.00 | -0.50 | b (0.900) | b (0.900) |" in text
    assert "| t2 | +1.00 | +0.00 | +0.00 | -0.50 | a (0.600) | b (0.800) |" in text
    # The mean row: recommended 0.750 against best 0.850 over the two tasks.
    assert "| **mean** | +1.00 | +0.00 | +0.00 | -0.50 | 0.750 | 0.850 |" in text
    assert text.count("| t1 | ") == 4 and text.count("| t2 | ") == 4  # the summary row and three candidates
    assert "Candidates: a, b, c." in text and "highest LogME" in text
