"""One evaluate's promotion in its own process, raced against another by tests/test_faults_concurrency.py.

    python tests/promote_child.py <tracking uri> <figure> <barrier dir> <role: early|late>

Registers a model with no files (an MLflow external model) whose target val
accuracy is `figure`, through tasks.promotion.promote, the code evaluate runs,
and prints the decision as JSON. It waits for <barrier>/go to start. To make
the harmful interleaving certain rather than lucky, the champion read is
followed by a wait until the rival has read it too, and the "late" process
then pauses LATE_S: without a lock or a check, both read the same champion
and the late one sets @champion last. A rival that waits for a lock this one
holds (a blocked request in /proc/locks) cannot read: then this one goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlflow

from tasks import promotion

HOLD_S = 120.0
LATE_S = 1.0
METRIC = "target_val.accuracy"


def wait_for(path: Path, timeout: float, unless=lambda: False) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or unless():
            return False
        time.sleep(0.02)
    return True


def blocked_on_a_lock(pid_file: Path) -> bool:
    """Whether the process whose pid `pid_file` holds waits for a file lock ("->" lines of /proc/locks)."""
    if not pid_file.exists():
        return False
    pid = pid_file.read_text().strip()
    lines = Path("/proc/locks").read_text().splitlines()
    return any(len(parts) > 5 and parts[1] == "->" and parts[5] == pid for parts in map(str.split, lines))


def main(uri: str, figure: float, barrier: Path, role: str) -> None:
    mlflow.set_tracking_uri(uri)
    rival = "late" if role == "early" else "early"
    read_champion = promotion.champion_figure

    def champion_then_wait(client, name, metric):
        found = read_champion(client, name, metric)
        (barrier / f"read-{role}").write_text(json.dumps([found, time.time()]))
        wait_for(barrier / f"read-{rival}", HOLD_S, unless=lambda: blocked_on_a_lock(barrier / f"pid-{rival}"))
        if role == "late":
            time.sleep(LATE_S)
        return found

    promotion.champion_figure = champion_then_wait
    with mlflow.start_run(run_name=f"evaluate-{role}"):
        model = mlflow.create_external_model(name="model")
        (barrier / f"pid-{role}").write_text(str(os.getpid()))
        (barrier / f"ready-{role}").touch()
        wait_for(barrier / "go", 300)
        decision = promotion.promote("xfer", model.model_uri, METRIC, figure, promotion.BY_TARGET_LABELS, {METRIC: str(figure)})
    print(json.dumps(decision.as_dict()))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
