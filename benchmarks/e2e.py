"""Per-stage wall time and orchestration overhead on the embedded default.

    python benchmarks/e2e.py [--params params.yaml] [--keep DIR] [--compare]

Runs each stage as `make run` does (`python -m flows.stages <stage>`, one
process each, all talking to one shared temporary Prefect server, see
flows/serve.py) in a scratch copy of the project, then splits every stage's
wall time into:

  startup   python start + imports (torch, timm, prefect, mlflow), measured
            once by importing flows.stages in a bare process
  work      the stage's own computation, timed inside the stage
  mlflow    the rest of the MLflow run: store setup, params, metrics,
            artifacts, model logging (timed inside the stage)
  prefect   what is left: the flow/task engine and its calls to the server

--compare also runs the stages without the shared server (each process then
starts a temporary server of its own, as plain `dvc repro` does) and prints
both totals and their ratio. All figures come from one run, side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ["fetch", "split", "features", "head", "finetune", "evaluate"]


def copy_project(dest: Path, params: Path) -> None:
    for name in ["xfer", "tasks", "flows"]:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(params, dest / "params.yaml")


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return elapsed


def run_stages(root: Path, env: dict) -> dict[str, float]:
    walls = {}
    for stage in STAGES:
        walls[stage] = timed([sys.executable, "-m", "flows.stages", stage], root, env)
        print(f"  {stage:<9} done in {walls[stage]:6.1f} s", file=sys.stderr)
    return walls


def scratch(params: Path, keep: Path | None) -> Path:
    root = keep or Path(tempfile.mkdtemp(prefix="xfer-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    copy_project(root, params)
    return root


def stage_timings(root: Path) -> dict[str, dict[str, float]]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import tracking_uri
    from xfer.layout import Layout

    mlflow.set_tracking_uri(tracking_uri(Layout(root)))
    client = MlflowClient()
    exp = client.get_experiment_by_name("xfer")
    out = {}
    for run in client.search_runs([exp.experiment_id], "tags.`xfer.kind` = 'stage'"):
        m = run.data.metrics
        out[run.data.tags["xfer.stage"]] = {"work": m["time.work_s"], "mlflow": m["time.tracking_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--keep", type=Path, help="run here and keep the outputs (default: a temporary folder)")
    parser.add_argument("--compare", action="store_true", help="also run without the shared Prefect server")
    args = parser.parse_args()

    import tasks  # noqa: F401  (offline defaults before prefect is imported)
    from prefect.server.api.server import SubprocessASGIServer

    root = scratch(args.params, args.keep)
    env = {**os.environ, "PREFECT_HOME": str(root / ".prefect"), "PYTHONPATH": str(root)}
    env.pop("PREFECT_API_URL", None)
    startup = min(timed([sys.executable, "-c", "import flows.stages"], root, env) for _ in range(2))

    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    started = time.perf_counter()
    server = SubprocessASGIServer()
    server.start(timeout=120)
    server_start = time.perf_counter() - started
    try:
        walls = run_stages(root, {**env, "PREFECT_API_URL": server.api_url})
    finally:
        server.stop()
    inner = stage_timings(root)

    print(f"\nxfer end-to-end, params {args.params.name}, {os.cpu_count()} CPU(s); seconds per stage\n")
    header = f"{'stage':<10}{'wall':>8}{'startup':>9}{'work':>8}{'mlflow':>8}{'prefect':>9}{'overhead %':>12}"
    print(header)
    print("-" * len(header))
    totals = dict.fromkeys(["wall", "startup", "work", "mlflow", "prefect"], 0.0)
    for stage in STAGES:
        wall, work, mlf = walls[stage], inner[stage]["work"], inner[stage]["mlflow"]
        prefect = max(wall - startup - work - mlf, 0.0)
        row = {"wall": wall, "startup": startup, "work": work, "mlflow": mlf, "prefect": prefect}
        for k, v in row.items():
            totals[k] += v
        print(f"{stage:<10}{wall:>8.1f}{startup:>9.1f}{work:>8.1f}{mlf:>8.1f}{prefect:>9.1f}{100 * (1 - work / wall):>11.0f}%")
    print("-" * len(header))
    t = totals
    print(f"{'total':<10}{t['wall']:>8.1f}{t['startup']:>9.1f}{t['work']:>8.1f}{t['mlflow']:>8.1f}{t['prefect']:>9.1f}{100 * (1 - t['work'] / t['wall']):>11.0f}%")
    print(f"\nshared Prefect server: started once in {server_start:.1f} s (not in the table)")
    if args.compare:
        alone = scratch(args.params, None)
        alone_env = {**env, "PREFECT_HOME": str(alone / ".prefect"), "PYTHONPATH": str(alone)}
        alone_walls = run_stages(alone, alone_env)
        shutil.rmtree(alone, ignore_errors=True)
        shared_total = t["wall"] + server_start
        alone_total = sum(alone_walls.values())
        print(f"without it (a temporary server per stage process, as plain `dvc repro`): {alone_total:.1f} s in all")
        print(f"with it (as `make run`): {shared_total:.1f} s in all, server start included: {alone_total / shared_total:.2f}x faster")
    print(f"\noutputs in {root}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
