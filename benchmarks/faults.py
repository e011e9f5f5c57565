"""Kill campaign: SIGKILL each stage at a random point, rerun it, check its outputs.

    python benchmarks/faults.py [--kills 20] [--seed 0] [--from start|flow] [--stages fetch,split,...] [--keep DIR]

In a scratch copy of a tiny project (the tests' tiny params: a timm test
backbone at 32 px, 12 digits per class and domain; a project-local MLflow
sqlite store; one temporary Prefect server for all stage processes, as `make
run` has) this first runs every stage once, uninterrupted, as `python -m
flows.stages <stage> --root DIR`, timing each and recording the sha256 of
every file of its outputs (xfer/contract.py: `outs` and `metrics`). Then, for
each stage, --kills times:

  1. remove the stage's outputs (and, for features, the feature cache, else the
     rerun is a cache hit and never computes), so the killed run does real work;
  2. start the stage in its own process group and, after a seeded random delay
     in [0, that stage's uninterrupted wall time) (with --from flow: counted from
     the moment its Prefect flow begins, past imports and param checks, in [0,
     the flow's uninterrupted duration)), SIGKILL the whole group (the
     stage, its temporary children, torchrun workers): what an OOM killer or a
     pulled plug does;
  3. rerun the stage to completion;
  4. check that no temporary file or folder of a killed write is left anywhere
     in the project's data/, models/, plots/, metrics/ or checkpoints/ (the
     downloads' staging folders and the feature cache included), and every
     output file: it loads (json parses, csv reads, .pt with
     torch.load(weights_only=True), .npy with numpy, .png with PIL), no file is
     missing or extra (a leftover temporary file inside an output is a
     failure), and it equals the uninterrupted run's file: byte-equal, or for
     json/csv/pt/npy numerically equal within --rtol/--atol (reported apart:
     `close`). fetch, split and features must be byte-equal (data and features
     are bit-reproducible); head, finetune and evaluate are expected to be
     byte-equal too on one machine and one thread (OMP_NUM_THREADS=1), and the
     table says whether they were.

It also counts MLflow runs left RUNNING in the store after each rerun (a run a
kill interrupted is never ended unless a later run of the stage marks it).

Prints a table (stage, kills, killed mid-run, survived, byte-equal, failures)
and writes benchmarks/results/faults.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from xfer.contract import STAGE_NAMES, STAGES  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# Stages whose outputs are bit-reproducible everywhere (DESIGN.md): anything but byte-equal fails.
DETERMINISTIC = ("fetch", "split", "features")
FEATURE_CACHE = "data/feature-cache"
RTOL, ATOL = 1e-6, 1e-9


def copy_project(dest: Path, params: dict) -> None:
    from helpers import write_params

    for name in ["xfer", "tasks", "flows", "servers"]:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dest, params)


def stage_env(prefect_home: Path, api_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "XFER_"))}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PREFECT_HOME=str(prefect_home),
        DO_NOT_TRACK="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    env.pop("PYTHONPATH", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_stage(stage: str, root: Path, env: dict, log: Path) -> subprocess.Popen:
    """`python -m flows.stages <stage>` in a process group of its own (so a kill reaches its children)."""
    out = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.stages", stage, "--root", str(root)],
        cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out.close()
    return proc


FLOW_STARTED = b"Beginning flow run"


def flow_started(log: Path, offset: int) -> bool:
    """Whether the stage process writing `log` past `offset` has begun its Prefect flow (imports and checks done)."""
    with open(log, "rb") as f:
        f.seek(offset)
        return FLOW_STARTED in f.read()


def wait_for_flow(proc: subprocess.Popen, log: Path, offset: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not flow_started(log, offset) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_stage(stage: str, root: Path, env: dict, log: Path) -> tuple[float, float]:
    """Run the stage to completion: (wall time, time from its flow's start to its exit)."""
    offset = log.stat().st_size if log.exists() else 0
    started = time.perf_counter()
    proc = start_stage(stage, root, env, log)
    wait_for_flow(proc, log, offset)
    in_flow = time.perf_counter()
    rc = proc.wait()
    ended = time.perf_counter()
    if rc != 0:
        raise RuntimeError(f"{stage} exited {rc}; last lines of {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return ended - started, ended - in_flow


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def killed_run(stage: str, root: Path, env: dict, log: Path, delay: float, origin: str = "start") -> tuple[bool, bool]:
    """Start the stage, SIGKILL its process group `delay` s after its start (origin "start") or after
    its flow began (origin "flow"): (whether it was still running, whether its flow had begun)."""
    offset = log.stat().st_size if log.exists() else 0
    proc = start_stage(stage, root, env, log)
    if origin == "flow":
        wait_for_flow(proc, log, offset)
    try:
        proc.wait(timeout=delay)
        finished = True
    except subprocess.TimeoutExpired:
        finished = False
    # Its children may outlive a finished stage too: the group goes either way.
    kill_group(proc)
    return not finished, flow_started(log, offset)


def output_paths(stage: str) -> tuple[str, ...]:
    return STAGES[stage].outs + STAGES[stage].metrics


def snapshot(root: Path, stage: str) -> dict[str, str]:
    """sha256 of every file under the stage's outputs, by path relative to the project."""
    files = {}
    for out in output_paths(stage):
        path = root / out
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        if not path.is_dir() and path.parent.is_dir():
            # A file output's temporary siblings (xfer/io.py: .<name>.<random>.tmp) are leftovers too.
            candidates += sorted(path.parent.glob(f".{path.name}.*"))
        for f in candidates:
            files[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def clear_outputs(root: Path, stage: str) -> None:
    targets = list(output_paths(stage)) + ([FEATURE_CACHE] if stage == "features" else [])
    for out in targets:
        path = root / out
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def load(path: Path):
    """The file parsed by what reads it; raises if it does not load."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".csv":
        import pandas as pd

        return pd.read_csv(path, keep_default_na=False)
    if suffix in (".pt", ".pth"):
        import torch

        return torch.load(path, weights_only=True, map_location="cpu")
    if suffix == ".npy":
        import numpy as np

        return np.load(path, allow_pickle=False)
    if suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
        return None
    return path.read_bytes()


def close(a, b) -> bool:
    """Equal within RTOL/ATOL: numbers, arrays, tensors, frames, and containers of them."""
    import numpy as np
    import pandas as pd
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL, equal_nan=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.dtype.kind in "fciub" and b.dtype.kind in "fciub":
            return a.shape == b.shape and bool(np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))
        return a.shape == b.shape and bool((a == b).all())
    if isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame):
        if list(a.columns) != list(b.columns) or a.shape != b.shape:
            return False
        return all(close(a[c].to_numpy(), b[c].to_numpy()) for c in a.columns)
    if isinstance(a, bool | str | bytes | type(None)) or isinstance(b, bool | str | bytes | type(None)):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return bool(np.isclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))
    return a == b


def check_outputs(root: Path, ref_root: Path, stage: str, reference: dict[str, str]) -> tuple[list[str], bool]:
    """What differs from the uninterrupted run (empty: survived), and whether every file is byte-equal."""
    now = snapshot(root, stage)
    problems = []
    for rel in sorted(reference.keys() - now.keys()):
        problems.append(f"missing {rel}")
    for rel in sorted(now.keys() - reference.keys()):
        problems.append(f"extra {rel}")
    byte_equal = not problems
    for rel in sorted(now.keys() & reference.keys()):
        try:
            value = load(root / rel)
        except Exception as e:  # noqa: BLE001  (any failure to load is the finding)
            problems.append(f"does not load: {rel} ({type(e).__name__}: {str(e)[:120]})")
            byte_equal = False
            continue
        if now[rel] == reference[rel]:
            continue
        byte_equal = False
        if stage in DETERMINISTIC or value is None or isinstance(value, bytes):
            problems.append(f"bytes differ: {rel}")
        elif not close(value, load(ref_root / rel)):
            problems.append(f"values differ: {rel}")
    return problems, byte_equal


# Where a killed write leaves temporaries: the outputs, the caches, downloads and checkpoints.
SCANNED = ("data", "models", "plots", "metrics", "checkpoints")


def stray_temporaries(root: Path) -> list[str]:
    """Temporary files and folders anywhere in the project's working folders (xfer/io.py's
    `.<name>.<random>.tmp|old`, fetch's `.staging-*`): after a finished rerun, every one is a leftover."""
    from xfer.data.fetch import STAGING_PREFIX
    from xfer.io import LEFTOVER

    found = []
    for top in SCANNED:
        for folder, dirs, files in os.walk(root / top):
            for name in [*dirs, *files]:
                if LEFTOVER.match(name) or name.startswith(STAGING_PREFIX):
                    found.append(str((Path(folder) / name).relative_to(root)))
            dirs[:] = [d for d in dirs if not LEFTOVER.match(d) and not d.startswith(STAGING_PREFIX)]
    return sorted(found)


def running_mlflow_runs(root: Path) -> int:
    db = root / "mlflow.db"
    if not db.exists():
        return 0
    # Read-write: a stage killed inside a transaction leaves a hot journal that a read-only connection cannot roll back.
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]


def campaign(root: Path, env: dict, stages: list[str], kills: int, seed: int, log: Path, origin: str = "start", on_stage=None) -> dict:
    """The uninterrupted run, then `kills` kill-and-rerun rounds per stage in `stages`; `on_stage(result so far)`
    after each stage's rounds (the results file then holds every finished stage if the campaign is stopped)."""
    ref_root = root.parent / (root.name + "-reference")
    walls, flow_walls, references = {}, {}, {}
    print("uninterrupted run:", file=sys.stderr)
    for stage in STAGE_NAMES:
        walls[stage], flow_walls[stage] = run_stage(stage, root, env, log)
        references[stage] = snapshot(root, stage)
        print(f"  {stage:<9} {walls[stage]:6.1f} s ({flow_walls[stage]:.1f} s in its flow), {len(references[stage])} output files", file=sys.stderr)
        for rel in references[stage]:
            (ref_root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, ref_root / rel)
        if stage == stages[-1]:
            break
    rng = random.Random(seed)
    rows = {}
    for stage in stages:
        row = {"kills": 0, "killed_mid_run": 0, "killed_in_flow": 0, "survived": 0, "byte_equal": 0, "failures": [], "delays_s": [], "rerun_s": []}
        for i in range(kills):
            delay = rng.uniform(0.0, walls[stage] if origin == "start" else flow_walls[stage])
            clear_outputs(root, stage)
            mid, in_flow = killed_run(stage, root, env, log, delay, origin)
            started = time.perf_counter()
            try:
                run_stage(stage, root, env, log)
                problems, byte_equal = check_outputs(root, ref_root, stage, references[stage])
                problems += [f"leftover {rel}" for rel in stray_temporaries(root)]
            except RuntimeError as e:
                problems, byte_equal = [f"rerun failed: {str(e).splitlines()[-1][:200]}"], False
            row["rerun_s"].append(round(time.perf_counter() - started, 1))
            row["kills"] += 1
            row["killed_mid_run"] += mid
            row["killed_in_flow"] += mid and in_flow
            row["delays_s"].append(round(delay, 2))
            row["survived"] += not problems
            row["byte_equal"] += byte_equal
            row["failures"] += [f"kill {i + 1} at {delay:.1f} s: {p}" for p in problems]
            state = "ok" if not problems else "; ".join(problems[:3])
            print(
                f"  {stage:<9} kill {i + 1}/{kills} at {delay:5.1f} s ({('in its flow' if in_flow else 'before its flow') if mid else 'after exit'}): {state}",
                file=sys.stderr,
            )
        row["mlflow_running_after"] = running_mlflow_runs(root)
        rows[stage] = row
        if on_stage is not None:
            on_stage({"walls_s": walls, "flow_s": flow_walls, "origin": origin, "rows": rows, "stages": stages})
    return {"walls_s": walls, "flow_s": flow_walls, "origin": origin, "rows": rows, "stages": stages}


def print_table(rows: dict) -> None:
    header = f"{'stage':<10}{'kills':>6}{'mid-run':>9}{'in flow':>9}{'survived':>10}{'byte-eq':>9}  failures"
    print(header)
    print("-" * len(header))
    for stage, r in rows.items():
        fails = "; ".join(r["failures"][:3]) + (f" (+{len(r['failures']) - 3})" if len(r["failures"]) > 3 else "") or "-"
        print(f"{stage:<10}{r['kills']:>6}{r['killed_mid_run']:>9}{r['killed_in_flow']:>9}{r['survived']:>10}{r['byte_equal']:>9}  {fails}")


def write_results(result: dict, args: argparse.Namespace, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unfinished = [s for s in result["stages"] if s not in result["rows"]]
    lines = [
        "# Kill campaign: SIGKILL each stage at a random point, rerun, compare with an uninterrupted run",
        "",
        *([f"**Partial**: the campaign was stopped before it reached {', '.join(unfinished)}.", ""] if unfinished else []),
        f"`python benchmarks/faults.py --kills {args.kills} --seed {args.seed} --from {args.origin}`, tiny params (tests/helpers.py TINY_PARAMS), "
        f"OMP_NUM_THREADS=1, one shared temporary Prefect server, project-local MLflow sqlite store; "
        f"campaign wall time {result['campaign_s']:.0f} s on {os.cpu_count()} cores.",
        "",
        "Uninterrupted wall time per stage, and in brackets from its flow's start to its exit (the kill delay is uniform "
        f"in [0, {'the first' if args.origin == 'start' else 'the bracketed'} figure) after "
        f"{'the process start' if args.origin == 'start' else 'the flow start'}): "
        + ", ".join(f"{s} {w:.1f} s ({result['flow_s'][s]:.1f} s)" for s, w in result["walls_s"].items())
        + ".",
        "",
        "| stage | kills | killed mid-run | of which in its flow | survived | byte-equal | MLflow runs left RUNNING | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for stage, r in result["rows"].items():
        fails = "<br>".join(r["failures"]) or "-"
        lines.append(
            f"| {stage} | {r['kills']} | {r['killed_mid_run']} | {r['killed_in_flow']} | {r['survived']} | {r['byte_equal']} | {r['mlflow_running_after']} | {fails} |"
        )
    lines += [
        "",
        "survived: after the rerun every output file loads and equals the uninterrupted run's, with no file missing or extra and no temporary of a killed write left anywhere in data/, models/, plots/, metrics/ or checkpoints/ "
        f"(byte-equal for fetch, split, features; for head, finetune, evaluate numerically within rtol {RTOL:g}, atol {ATOL:g}). "
        "byte-equal: of those, how many were identical to the byte. killed mid-run: the stage was still running when "
        "its process group got SIGKILL (else it had exited first, and only its children could be hit); in its flow: "
        "its Prefect flow had begun (imports and param checks done, the stage's work under way), else it died while starting. "
        "MLflow runs left RUNNING: in the store after that stage's last rerun, cumulative over the campaign.",
        "",
    ]
    (out / "faults.md").write_text("\n".join(lines))
    (out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per stage (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated, in pipeline order")
    parser.add_argument(
        "--from",
        dest="origin",
        choices=["start", "flow"],
        default="start",
        help="count the kill delay from the process start (default; many kills then land in imports) or from the flow's start",
    )
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one, removed)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results/faults.*")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--stages {args.stages!r}: unknown {unknown}; valid: {', '.join(STAGE_NAMES)}")
    if args.kills < 1:
        parser.error(f"--kills {args.kills}: must be 1 or more")
    stages = [s for s in STAGE_NAMES if s in stages]

    from helpers import TINY_PARAMS

    base = args.keep or Path(tempfile.mkdtemp(prefix="xfer-faults-"))
    root = base / "project"
    if root.exists():
        sys.exit(f"--keep {base}: {root} exists; give an empty folder")
    root.mkdir(parents=True)
    copy_project(root, TINY_PARAMS)
    prefect_home = base / "prefect"
    prefect_home.mkdir()
    os.environ["PREFECT_HOME"] = str(prefect_home)
    os.environ.update(DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    log = base / "stages.log"
    started = time.perf_counter()

    def write_so_far(partial: dict) -> None:
        if not args.no_write:
            write_results({**partial, "campaign_s": time.perf_counter() - started, "kills_per_stage": args.kills, "seed": args.seed}, args)

    try:
        result = campaign(root, stage_env(prefect_home, server.api_url), stages, args.kills, args.seed, log, args.origin, write_so_far)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    result["campaign_s"] = time.perf_counter() - started
    result["kills_per_stage"], result["seed"] = args.kills, args.seed
    print(f"\ncampaign: {result['campaign_s']:.0f} s, --kills {args.kills}, --seed {args.seed}")
    print_table(result["rows"])
    if not args.no_write:
        write_results(result, args)
    return 0 if all(r["survived"] == r["kills"] for r in result["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
