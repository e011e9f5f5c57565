"""How long `head.method: auto` takes on the digits default: the search as the head stage runs it.

    .venv/bin/python benchmarks/head_search.py [--processes 1 2] [--repeats 1]

Times xfer.head_search.search_heads, evidence and all (the domain classifier
and k-means the validators share, every candidate's training with its
per-epoch validators, the panel), on the digits default's cached features
(benchmarks/shift_tasks.py) with params.yaml's head section, once per
`head.search_processes` value, side by side in one run. The pick and its
weights must not depend on the process count: the script checks that the
summaries agree. Writes benchmarks/results/head_search.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shift_tasks  # noqa: E402
from xfer.config import load_params  # noqa: E402
from xfer.head_search import candidate_grid, search_heads  # noqa: E402
from xfer.head_stage import head_data  # noqa: E402
from xfer.io import write_json, write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
GOAL_SECONDS = 60  # issue 16: the search on the digits default, 2 cores


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()
    )
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def time_search(params, data, num_classes: int, processes: int) -> tuple[float, dict]:
    cfg = params.head.model_copy(update={"method": "auto", "search_processes": processes})
    start = time.perf_counter()
    result = search_heads(cfg, data, num_classes, params.seed)
    return time.perf_counter() - start, result.summary


def markdown(result: dict) -> str:
    lines = [
        f"`head.method: auto` on the digits default ({result['rows']}), {result['candidates']} candidates x {result['epochs']} epochs, "
        f"selection {result['selection']}: wall time of the whole search (evidence, training with per-epoch validators, panel), "
        f"median of {result['repeats']}. Goal: at most {GOAL_SECONDS} s on 2 cores.",
        "",
        "| head.search_processes | seconds | kept |",
        "|---:|---:|---|",
    ]
    lines += [f"| {row['processes']} | {row['seconds']:.1f} | {row['kept']} |" for row in result["runs"]]
    same = "the same" if result["same_pick"] else "**different**"
    lines += ["", f"Every process count gave {same} panel and pick. Machine: {result['machine']}. Written by `benchmarks/head_search.py`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    params = load_params(REPO / "params.yaml")
    fs = shift_tasks.task_features(shift_tasks.DEFAULT_TASK, params)
    data = head_data(fs)
    num_classes = int(fs.index.label.max()) + 1
    runs, summaries = [], []
    for processes in args.processes:
        times = []
        for _ in range(args.repeats):
            seconds, summary = time_search(params, data, num_classes, processes)
            times.append(seconds)
        summaries.append(summary)
        runs.append({"processes": processes, "seconds": sorted(times)[len(times) // 2], "kept": summary["kept"]})
        print(f"search_processes {processes}: {runs[-1]['seconds']:.1f} s, kept {summary['kept']}", flush=True)
    result = {
        "machine": machine(),
        "rows": f"{len(data.source_train[1])} source train, {len(data.target_train)} unlabelled target rows",
        "candidates": len(candidate_grid(params.head)),
        "epochs": params.head.epochs,
        "selection": params.head.selection,
        "repeats": args.repeats,
        "runs": runs,
        "same_pick": all(s["candidates"] == summaries[0]["candidates"] and s["kept"] == summaries[0]["kept"] for s in summaries),
    }
    write_json(RESULTS / "head_search.json", result)
    write_text(RESULTS / "head_search.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
