"""Per-stage wall time and orchestration overhead on the embedded default.

    python benchmarks/e2e.py [--params params.yaml] [--keep DIR] [--compare] [--servers]

Runs each stage as `make run` does (`python -m flows.stages <stage>`, one
process each, all talking to one shared temporary Prefect server, see
servers/temporary_prefect.py) in a scratch copy of the project, then splits every stage's
wall time into:

  startup   python start + the imports of that stage's process (its own task
            module and checks, xfer/contract.py), measured in a bare process
  work      the stage's own computation, timed inside the stage
  mlflow    the rest of the MLflow run: store setup, params, metrics,
            artifacts, model logging (timed inside the stage)
  prefect   what is left: the flow/task engine and its calls to the server

--compare also runs the stages without the shared server (each process then
starts a temporary server of its own, as plain `dvc repro` does) and prints
both totals and their ratio. --servers also runs the stages with a temporary
server per process and against a Prefect server started as `make servers`
starts it (servers/supervisor.py; kept running, so its start is not paid per
command), and prints each stage's prefect overhead in the three modes side
by side. All figures come from one run. On the project's own params.yaml
(the default) it writes what it printed to benchmarks/results/e2e.{md,json},
which the README shows; on any other --params it writes nothing there.

A quick check on tiny params (a test backbone, a few images per class):

    mkdir -p /tmp/tiny && python -c "import sys; sys.path.insert(0, 'tests'); from helpers import *; \
               from pathlib import Path; write_params(Path('/tmp/tiny'), TINY_PARAMS)"
    python benchmarks/e2e.py --params /tmp/tiny/params.yaml --servers
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

from xfer.contract import STAGE_NAMES as STAGES  # noqa: E402
from xfer.contract import STAGES as CONTRACT  # noqa: E402


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


def measure(root: Path, env: dict, startup: dict[str, float]) -> dict[str, dict[str, float]]:
    """Run every stage in `root` with `env`; split each one's wall time (see the docstring)."""
    walls = run_stages(root, env)
    inner = stage_timings(root)
    rows = {}
    for stage in STAGES:
        wall, work, mlf = walls[stage], inner[stage]["work"], inner[stage]["mlflow"]
        prefect = max(wall - startup[stage] - work - mlf, 0.0)
        rows[stage] = {"wall": wall, "startup": startup[stage], "work": work, "mlflow": mlf, "prefect": prefect}
    return rows


def breakdown(rows: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, float]]:
    """The table's lines (one per stage, then the total) and the totals."""
    header = f"{'stage':<10}{'wall':>8}{'startup':>9}{'work':>8}{'mlflow':>8}{'prefect':>9}{'overhead %':>12}"
    lines = [header, "-" * len(header)]
    totals = dict.fromkeys(["wall", "startup", "work", "mlflow", "prefect"], 0.0)
    for stage, row in list(rows.items()) + [("total", totals)]:
        if stage == "total":
            lines.append("-" * len(header))
        else:
            for k, v in row.items():
                totals[k] += v
        r = row
        lines.append(
            f"{stage:<10}{r['wall']:>8.1f}{r['startup']:>9.1f}{r['work']:>8.1f}{r['mlflow']:>8.1f}{r['prefect']:>9.1f}{100 * (1 - r['work'] / r['wall']):>11.0f}%"
        )
    return lines, totals


def with_temporary_server(root: Path, env: dict, startup: dict[str, float]) -> tuple[dict, float]:
    """The stages against one temporary server for them all (as `make run`); its start time."""
    from prefect.server.api.server import SubprocessASGIServer

    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]
    started = time.perf_counter()
    server = SubprocessASGIServer()
    server.start(timeout=120)
    server_start = time.perf_counter() - started
    try:
        return measure(root, {**env, "PREFECT_API_URL": server.api_url}, startup), server_start
    finally:
        server.stop()


def with_running_servers(root: Path, env: dict, startup: dict[str, float]) -> tuple[dict, float]:
    """The stages against servers started as `make servers` does (servers/supervisor.py); their start time."""
    from servers import supervisor

    os.environ["PREFECT_HOME"] = env["PREFECT_HOME"]  # the server's home, as the Makefile exports it
    started = time.perf_counter()
    urls = supervisor.start(root, free_port(), free_port())
    server_start = time.perf_counter() - started
    try:
        return measure(root, {**env, "PREFECT_API_URL": urls["prefect"] + "/api"}, startup), server_start
    finally:
        supervisor.stop(root)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_env(env: dict, root: Path) -> dict:
    return {**env, "PREFECT_HOME": str(root / ".prefect"), "PYTHONPATH": str(root)}


def prefect_side_by_side(modes: dict[str, dict[str, dict[str, float]]], starts: dict[str, float]) -> list[str]:
    """Each stage's prefect overhead (seconds) per mode, then each mode's total wall time."""
    names = list(modes)
    width = max(len(n) for n in names) + 2
    lines = ["", "prefect overhead per stage (s), by where the stages find a Prefect server", ""]
    lines.append(f"{'stage':<10}" + "".join(f"{n:>{width}}" for n in names))
    for stage in STAGES:
        lines.append(f"{stage:<10}" + "".join(f"{modes[n][stage]['prefect']:>{width}.1f}" for n in names))
    lines.append(f"{'total':<10}" + "".join(f"{sum(r['prefect'] for r in modes[n].values()):>{width}.1f}" for n in names))
    lines.append(f"{'wall':<10}" + "".join(f"{sum(r['wall'] for r in modes[n].values()):>{width}.1f}" for n in names))
    lines += [f"  {name}: server started once in {seconds:.1f} s (not in the table)" for name, seconds in starts.items()]
    return lines


def write_results(lines: list[str], result: dict, argv: list[str]) -> None:
    """results/e2e.md (the printed figures, as a text block under the command) and results/e2e.json."""
    from xfer.io import write_json, write_text

    results = REPO / "benchmarks" / "results"
    command = " ".join(["python benchmarks/e2e.py", *argv])
    text = "\n".join([f"`{command}`, {os.cpu_count()} CPU(s), {time.strftime('%Y-%m-%d')}:", "", "```text", *lines, "```", ""])
    write_text(results / "e2e.md", text)
    write_json(results / "e2e.json", result)
    print(f"wrote {results / 'e2e.md'} and e2e.json", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="a params file (default: the project's)")
    parser.add_argument("--keep", type=Path, help="run here and keep the outputs (default: a temporary folder)")
    parser.add_argument("--compare", action="store_true", help="also run without the shared Prefect server")
    parser.add_argument("--servers", action="store_true", help="also run per-process servers and `make servers`; compare prefect overhead")
    args = parser.parse_args()

    import tasks  # noqa: F401  (offline defaults before prefect is imported)

    root = scratch(args.params, args.keep)
    base_env = {**os.environ}
    base_env.pop("PREFECT_API_URL", None)
    env = scratch_env(base_env, root)
    startup = {stage: min(timed([sys.executable, "-c", f"import {', '.join(CONTRACT[stage].entry_modules)}"], root, env) for _ in range(2)) for stage in STAGES}

    shared, server_start = with_temporary_server(root, env, startup)
    result = {"params": args.params.name, "cpus": os.cpu_count(), "shared_server": shared, "shared_server_start_s": server_start}
    table, totals = breakdown(shared)
    lines = [f"xfer end-to-end, params {args.params.name}; seconds per stage", "", *table]
    lines += ["", f"shared Prefect server: started once in {server_start:.1f} s (not in the table)"]
    if args.compare or args.servers:
        alone = scratch(args.params, None)
        alone_rows = measure(alone, scratch_env(base_env, alone), startup)
        shutil.rmtree(alone, ignore_errors=True)
        shared_total = totals["wall"] + server_start
        alone_total = sum(r["wall"] for r in alone_rows.values())
        result["server_per_stage"] = alone_rows
        lines.append(f"without it (a temporary server per stage process, as plain `dvc repro`): {alone_total:.1f} s in all")
        lines.append(f"with it (as `make run`): {shared_total:.1f} s in all, server start included: {alone_total / shared_total:.2f}x faster")
    if args.servers:
        running = scratch(args.params, None)
        running_rows, running_start = with_running_servers(running, scratch_env(base_env, running), startup)
        shutil.rmtree(running, ignore_errors=True)
        result["make_servers"], result["make_servers_start_s"] = running_rows, running_start
        modes = {"own temp server": alone_rows, "shared temp (make run)": shared, "make servers": running_rows}
        lines += prefect_side_by_side(modes, {"shared temp (make run)": server_start, "make servers": running_start})
    print("\n" + "\n".join(lines))
    if args.params.resolve() == (REPO / "params.yaml").resolve():
        write_results(lines, result, sys.argv[1:])
    else:
        print(f"not written to benchmarks/results/ ({args.params} is not the project's params.yaml)", file=sys.stderr)
    print(f"\noutputs in {root}" if args.keep else "")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
