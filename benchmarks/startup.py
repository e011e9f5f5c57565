"""Each stage process's startup, before and after: Python start plus what it imports before its work.

    .venv/bin/python benchmarks/startup.py [--before 31d3f59] [--repeats 5]

A stage process is `python -m flows.stages <stage>`. Before the stage
contract (commit --before), flows/stages.py imported every stage's task
module, so each process loaded the whole project; now it imports its own
task module and checks by name (xfer/contract.py). For each stage this times,
side by side in one run and alternating so that a busy machine hurts both
alike, a fresh interpreter importing what that process imports: `--before`'s
tree (exported with `git archive`) and this tree. The median of --repeats is
reported, with the libraries alone for scale. Writes
benchmarks/results/startup.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
BEFORE = "31d3f59"  # main before the stage contract landed
LIBRARIES = ("prefect", "mlflow", "torch", "timm")


def import_seconds(tree: Path, modules: list[str]) -> float:
    """Wall time of a fresh interpreter that imports `modules` from `tree`, then exits."""
    code = "import importlib\nfor m in %r: importlib.import_module(m)\n" % (modules,)
    env = {**os.environ, "PYTHONPATH": str(tree), "DO_NOT_TRACK": "true"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def export(ref: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref, "xfer", "tasks", "flows"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure(before_tree: Path, repeats: int) -> dict:
    from xfer.contract import STAGES

    rows = {}
    for name, stage in STAGES.items():
        before, after = [], []
        for _ in range(repeats):
            # The old entry imported every task module: flows.stages alone is the whole process.
            before.append(import_seconds(before_tree, ["flows.stages"]))
            after.append(import_seconds(REPO, list(stage.entry_modules)))
        rows[name] = {"before_s": statistics.median(before), "after_s": statistics.median(after)}
        print(f"  {name:<9} before {rows[name]['before_s']:5.2f} s  after {rows[name]['after_s']:5.2f} s", file=sys.stderr)
    libraries = {lib: statistics.median(import_seconds(REPO, [lib]) for _ in range(repeats)) for lib in LIBRARIES}
    bare = statistics.median(import_seconds(REPO, []) for _ in range(repeats))
    return {"stages": rows, "libraries": libraries, "python_s": bare}


def markdown(result: dict, ref: str, repeats: int) -> str:
    lines = [
        f"# Stage process startup: Python start + imports, before ({ref}) and after the stage contract",
        "",
        f"`python benchmarks/startup.py --before {ref}`, {os.cpu_count()} cores; median of {repeats}, each a fresh interpreter, "
        "before and after alternating in one run.",
        "",
        "| stage | before s | after s | after / before |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {r['before_s']:.2f} | {r['after_s']:.2f} | {r['after_s'] / r['before_s']:.2f} |" for name, r in result["stages"].items()),
        "",
        f"For scale, a fresh interpreter alone: {result['python_s']:.2f} s; with one library each: "
        + ", ".join(f"{lib} {s:.2f} s" for lib, s in result["libraries"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help=f"the git ref to compare with (default {BEFORE})")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from xfer.io import write_json, write_text

    with tempfile.TemporaryDirectory(prefix="xfer-startup-") as tmp:
        result = measure(export(args.before, Path(tmp)), args.repeats)
    result["before_ref"] = args.before
    write_json(RESULTS / "startup.json", result)
    text = markdown(result, args.before, args.repeats)
    write_text(RESULTS / "startup.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
