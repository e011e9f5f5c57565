"""The temperature of `soft_info_max`, chosen without the target labels of the task it is used on.

benchmarks/selection.py runs this beside its validators, on the candidates it
has trained (one training for both). For each temperature T of a grid,
information maximisation read on the target predictions softened to T
(xfer/validators/soft_info_max.py) picks each candidate's epoch (ties to the
later) and then the candidate (ties to the earlier, source_only first): what
`head.method: auto` with that validator picks before its guard. Target test
scores the pick. T = 1 is `info_max`.

Then, leave one task out: for each task, T is chosen on the *other* tasks
(their mean accuracy; ties to the smaller T) and that T's accuracy on the
held-out task is read. A T that is chosen the same way whichever task is held
out, and that holds on the held-out task, was not tuned to any one of them.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.info_max import information
from xfer.validators.soft_info_max import TEMPERATURE, soften

TEMPERATURES = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)


def pick(target_outputs: list[list[np.ndarray]], temperature: float) -> tuple[int, int]:
    """(candidate, epoch index) that info_max at `temperature` keeps from each candidate's per-epoch
    target predictions: per candidate the best epoch (ties to the later), across candidates the
    best of those (ties to the earlier)."""
    epochs, best = [], []
    for per_epoch in target_outputs:
        scores = [information(soften(t, temperature)) for t in per_epoch]
        e = len(scores) - 1 - scores[::-1].index(max(scores))
        epochs.append(e)
        best.append(scores[e])
    c = int(np.argmax(best))
    return c, epochs[c]


def sweep(target_outputs: list[list[np.ndarray]], test_accuracy: list[list[float]]) -> dict[str, float]:
    """Per temperature (its str), the target test accuracy of the pick."""
    out = {}
    for T in TEMPERATURES:
        c, e = pick(target_outputs, T)
        out[str(T)] = test_accuracy[c][e]
    return out


def leave_one_task_out(accuracy: dict[str, dict[float, float]]) -> dict[str, dict]:
    """Per held-out task: the temperature with the best mean accuracy over the other tasks (ties to
    the smaller), and that temperature's accuracy on the held-out task."""
    out = {}
    for held in accuracy:
        rest = [t for t in accuracy if t != held]
        temps = sorted(accuracy[held])
        chosen = max(temps, key=lambda T: (np.mean([accuracy[t][T] for t in rest]), -T))
        out[held] = {"chosen": chosen, "held_out": accuracy[held][chosen]}
    return out


def markdown(tasks: dict[str, dict[str, float]]) -> list[str]:
    """The sweep's table: per task (mean over seeds) each temperature's accuracy, the T the other tasks
    choose and its accuracy on this one."""
    temps = sorted({float(T) for row in tasks.values() for T in row})
    acc = {n: {T: row[str(T)] for T in temps} for n, row in tasks.items()}
    if len(acc) < 2:  # nothing to hold out against
        return ["The temperature sweep of `soft_info_max` needs two tasks or more: leave one task out has no others here."]
    loo = leave_one_task_out(acc)
    chosen_all = max(temps, key=lambda T: (np.mean([acc[n][T] for n in acc]), -T))
    lines = [
        "The temperature of `soft_info_max`: what `auto` picks (before the guard) with info_max read on predictions "
        "softened to T (T = 1 is `info_max`), per task. **chosen on the others**: the T with the best mean over the "
        "other tasks (ties to the smaller); **held out**: that T's accuracy on this task, which had no say in it.",
        "",
        "| task | " + " | ".join(f"T={T:g}" for T in temps) + " | chosen on the others | held out |",
        "|---|" + "---:|" * (len(temps) + 2),
    ]
    for n in acc:
        lines.append(f"| {n} | " + " | ".join(f"{acc[n][T]:.3f}" for T in temps) + f" | {loo[n]['chosen']:g} | {loo[n]['held_out']:.3f} |")
    means = [np.mean([acc[n][T] for n in acc]) for T in temps]
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + f" | | {np.mean([v['held_out'] for v in loo.values()]):.3f} |")
    lines += [
        "",
        f"Chosen on all {len(acc)} tasks together: T = {chosen_all:g}; `soft_info_max` has T = {TEMPERATURE:g}. "
        "Target test labels choose T here only across tasks, never on the task they score.",
    ]
    return lines
