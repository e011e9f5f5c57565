"""Feature extraction throughput against the backbone's own ceiling, and a cache hit's cost.

    python benchmarks/features.py [--rows 2000] [--size 64] [--batch 128]
        [--backbone tf_efficientnet_lite0] [--workers 0 [1 ...]] [--device cpu] [--photos PX]
    python benchmarks/features.py --scale [--rows 20000] [--shard-rows 512 2048 8192]
        [--headline-shard 2048] [--sweep-rows ROWS]

In a temporary folder it writes `--rows` real 8x8 greyscale PNGs (the default
dataset's images are 8x8 of 0..16), or with `--photos PX` photo-like RGB JPEGs of
PX x PX (smooth colour fields with grain, quality 90: what a photo costs the
decoder), and their manifest, then measures in one run:

  extract     images/s of `xfer.features.extract` over the files: what the
              features stage does (decode, resize, normalise, forward), once
              per `--workers` value
  loader      images/s of the same DataLoader without the model: the input
              side alone
  forward     the ceiling: images/s of the same backbone (num_classes=0, eval,
              inference_mode) on the same batches preloaded as tensors
  ratio       extract / forward: 1.0 means the input side costs nothing
  cache hit   seconds of a hit: `get_or_compute` + `load_entry` alone, and
              with building the backbone for its weights digest and the key
              first, as the features stage does on a hit

Everything is warmed up before it is timed; each figure is the median of
`--repeats` rounds, and every round times all of them one after the other. Prints a table and writes benchmarks/results/features.json
and benchmarks/results/features.md.

`--scale` measures the features stage's sharded path instead (default 20,000
images), each variant once, against one temporary Prefect server:

  one pass    `extract` over every row in this process, one torch thread, no
              Prefect: the reference bytes and the per-core compute rate
  runs        `tasks.features.cached_features` inside a flow (shards mapped as
              Prefect tasks) on the threads runner with 1 worker (the
              single-process path) and 2, and on a Dask LocalCluster of 1
              and 2 worker processes; for 2 workers, each `--shard-rows`;
              and 2 workers of a Dask cluster started with Dask's default
              worker environment (MALLOC_TRIM_THRESHOLD_=65536, which the
              stage's own local cluster leaves unset): what it costs a shard
  identical   every run's features.npy against the single-process run's, byte
              for byte (exit 1 if any differs)
  per shard   from the task runs on the Prefect server: when the first shard
              started, each shard's seconds, the idle gap between a worker's
              shards, and the workers' utilisation
  start-up    a Dask LocalCluster of 1 and 2 workers started alone, and the
              seconds for its workers to import the stage's modules
  per image   seconds of decode + resize per image (8x8 PNG, 256 and 512 px
              JPEGs) and of the forward pass (64 and 224 px), on one thread:
              what a projection to bigger images rests on

It writes benchmarks/results/features_scale.json and features_scale.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xfer import features as feats  # noqa: E402
from xfer.backbones import create_backbone, offline_pretrained_names  # noqa: E402
from xfer.config import BackboneConfig  # noqa: E402
from xfer.data.images import ImageRows  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def write_images(root: Path, rows: int, seed: int = 0) -> pd.DataFrame:
    """`rows` 8x8 PNGs of 0..16 scaled to 0..255 (optdigits-like), and their manifest."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    paths = []
    for i in range(rows):
        path = f"img/{i:06d}.png"
        pixels = (rng.integers(0, 17, (8, 8)) * 255 // 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / path)
        paths.append(path)
    return manifest_of(root, paths)


def write_photos(root: Path, rows: int, px: int, seed: int = 0) -> pd.DataFrame:
    """`rows` photo-like RGB JPEGs of px x px (write_jpegs), and their manifest."""
    return manifest_of(root, write_jpegs(root, rows, px, seed))


def manifest_of(root: Path, paths: list[str]) -> pd.DataFrame:
    """A manifest of image files under `root`: alternately source and target train, ten classes."""
    records = []
    for i, path in enumerate(paths):
        role, split = ("source", "train") if i % 2 == 0 else ("target", "train")
        records.append(
            {
                "path": path,
                "label": i % 10,
                "class_name": str(i % 10),
                "domain": role,
                "role": role,
                "split": split,
                "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest(),
            }
        )
    return pd.DataFrame(records, columns=[*feats.INDEX_COLUMNS, "class_name"])


def backbone_config(name: str, size: int) -> BackboneConfig:
    # Offline ImageNet weights where xfer has them (lite0), else seeded random init.
    return BackboneConfig(name=name, pretrained=name in offline_pretrained_names(), image_size=size)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- --scale


def write_jpegs(root: Path, count: int, size: int, seed: int = 0) -> list[str]:
    """`count` RGB JPEGs of size x size, quality 90: smooth colour fields with grain, photo-like to the encoder."""
    rng = np.random.default_rng(seed)
    folder = root / f"jpg{size}"
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        coarse = (rng.random((size // 16 + 1, size // 16 + 1, 3)) * 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-6, 7, (size, size, 3)), 0, 255).astype(np.uint8)
        path = f"jpg{size}/{i:05d}.jpg"
        Image.fromarray(pixels).save(root / path, quality=90)
        paths.append(path)
    return paths


def loader_s_per_image(paths: list[str], prep, root: Path, repeats: int) -> float:
    """Seconds per image of ImageRows (open, decode, RGB, resize, normalise) in this thread."""
    data = ImageRows(paths, [0] * len(paths), prep, root)

    def once():
        for i in range(len(data)):
            data[i]

    once()  # page cache, first-call allocations
    return median_time(once, repeats) / len(data)


@torch.inference_mode()
def forward_s_per_image(model, size: int, batch: int, batches: int, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    model(x)  # oneDNN kernel choice for this shape

    def once():
        for _ in range(batches):
            model(x)

    return median_time(once, repeats) / (batch * batches)


def dask_startup(workers: int) -> dict:
    """Seconds to start a LocalCluster as the dask runner does, to import the stage on its workers, and to stop it."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
    client = Client(cluster)
    client.wait_for_workers(workers)
    up = time.perf_counter() - start
    t = time.perf_counter()
    client.run(lambda: __import__("tasks.features"))
    imported = time.perf_counter() - t
    t = time.perf_counter()
    client.close()
    cluster.close()
    return {"workers": workers, "start_s": up, "import_stage_s": imported, "stop_s": time.perf_counter() - t}


def shard_timings(expected: int, workers: int) -> dict:
    """Per-shard figures from the feature-shard task runs of the newest `feature-shards` flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (subflow,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["feature-shards"])), sort=FlowRunSort.START_TIME_DESC, limit=1)
        # Task run states reach the server as events, recorded a moment later.
        deadline = time.monotonic() + 30
        while True:
            runs, page = [], None
            while page is None or len(page) == 200:  # the server's largest page
                page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[subflow.id])), limit=200, offset=len(runs))
                runs += page
            done = [r for r in runs if r.name.startswith("feature-shard") and r.start_time and r.end_time and r.state and r.state.is_completed()]
            if len(done) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    spans = sorted((r.start_time.timestamp(), r.end_time.timestamp()) for r in done)
    if len(spans) < expected:
        return {"shards_seen": len(spans)}
    durations = [b - a for a, b in spans]
    # Which worker ran which shard is not recorded: a shard goes to the worker that freed last before it started.
    free: list[float] = []  # when each worker's latest shard ended
    gaps = []
    for a, b in spans:
        if len(free) < workers:
            free.append(b)
            continue
        earlier = [t for t in free if t <= a + 1e-3]
        last = max(earlier) if earlier else min(free)
        gaps.append(max(0.0, a - last))
        free[free.index(last)] = b
    first, last_end = spans[0][0], max(b for _, b in spans)
    return {
        "shards_seen": len(spans),
        "first_start": first,
        "last_end": last_end,
        "shard_s": {"min": min(durations), "median": statistics.median(durations), "max": max(durations)},
        # The first shard a worker runs builds the backbone there (and imports torch on a Dask worker).
        "first_shards_s": durations[:workers],
        "gap_s_median": statistics.median(gaps) if gaps else None,
        "utilisation": sum(durations) / (workers * (last_end - first)),
    }


DASK_DEFAULT_ENV = "Dask default worker env: MALLOC_TRIM_THRESHOLD_=65536"


def drain_prefect() -> None:
    """Send the logs and events still queued to the server, before it stops (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.instance().drain()
    except RuntimeError:  # never started
        pass
    EventsWorker.drain_all()


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children so far."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def scale_main(args) -> int:
    bench_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="xfer-bench-scale-"))
    # Prefect reads its home at import: a throwaway one, with its own server database.
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import shutil

    from prefect import flow
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks  # noqa: F401  (offline defaults before prefect is imported)
    from tasks.features import cached_features
    from xfer.config import FeaturesConfig
    from xfer.data.split import read_manifest
    from xfer.io import write_json, write_text
    from xfer.layout import Layout

    batch = args.batch
    sweep_rows = args.sweep_rows or args.rows
    if sweep_rows > args.rows or (sweep_rows < args.rows and sweep_rows % batch):
        raise SystemExit(f"--sweep-rows must be at most --rows and a multiple of --batch {batch} (its features are the first rows')")
    for shard in [*args.shard_rows, args.headline_shard]:
        if shard % batch:
            raise SystemExit(f"shard rows {shard} is not a multiple of --batch {batch}")
    shard_sizes = sorted(set(args.shard_rows) | {args.headline_shard})
    load_before = os.getloadavg()[0]
    date = time.strftime("%Y-%m-%d")
    cfg = backbone_config(args.backbone, args.size)

    root = tmp / "project"
    layout = Layout(root)
    t0 = time.perf_counter()
    frame = write_images(root, args.rows)
    layout.manifest.parent.mkdir(parents=True)
    frame.to_csv(layout.manifest, index=False)
    manifest = read_manifest(layout.manifest)
    print(f"wrote {args.rows} PNGs (8x8 grey) and their manifest in {time.perf_counter() - t0:.1f} s", flush=True)

    # Per image, on one thread: decode + resize of bigger files, and the forward pass at 64 and 224 px.
    torch.set_num_threads(1)
    model, prep, _ = create_backbone(cfg, num_classes=0)
    model.eval()
    per_image = {"loader_s": {}, "forward_s": {}, "file_bytes": {}}
    per_image["loader_s"]["png8"] = loader_s_per_image(manifest.path.tolist()[:1000], prep, root, args.repeats)
    per_image["file_bytes"]["png8"] = statistics.mean((root / p).stat().st_size for p in manifest.path[:1000])
    for size in (256, 512):
        paths = write_jpegs(root, args.decode_images, size)
        per_image["loader_s"][f"jpeg{size}"] = loader_s_per_image(paths, prep, root, args.repeats)
        per_image["file_bytes"][f"jpeg{size}"] = statistics.mean((root / p).stat().st_size for p in paths)
    per_image["forward_s"]["64"] = forward_s_per_image(model, 64, batch, 4, args.repeats)
    per_image["forward_s"]["224"] = forward_s_per_image(model, 224, 32, 2, args.repeats)
    print("per image, one thread:", json.dumps(per_image), flush=True)

    # The reference: one pass over every row, this process, one intra-op thread, no Prefect.
    t0 = time.perf_counter()
    with feats.one_intra_op_thread():
        reference = feats.extract(model, manifest, prep, batch, root=root, progress=False)
    one_pass_s = time.perf_counter() - t0
    print(f"one pass (no runner): {args.rows} rows in {one_pass_s:.1f} s, {args.rows / one_pass_s:.0f} img/s", flush=True)
    del model
    torch.set_num_threads(args.threads)

    startup = []
    server = SubprocessASGIServer()
    t0 = time.perf_counter()
    server.start(timeout=120)
    server_start_s = time.perf_counter() - t0
    # Dask worker processes inherit the environment: they report to this server too.
    os.environ["PREFECT_API_URL"] = server.api_url
    runs: list[dict] = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):

            @flow(name="bench-features-scale")
            def stage(rows: int, features_json: str) -> dict:
                fcfg = FeaturesConfig.model_validate_json(features_json)
                start = time.time()
                out = cached_features(layout, cfg, fcfg, manifest.iloc[:rows] if rows < len(manifest) else manifest)
                return {**out, "start": start, "end": time.time()}

            def run(kind: str, workers: int, shard: int, rows: int, note: str | None = None, address: str | None = None) -> dict:
                fcfg = FeaturesConfig(batch_size=batch, shard_rows=shard, runner={"kind": kind, "workers": workers, "address": address})
                load = os.getloadavg()[0]
                server_cpu, ticks = tree_cpu_s(server.server_process.pid), cpu_ticks()
                out = stage(rows, fcfg.model_dump_json())
                server_cpu = tree_cpu_s(server.server_process.pid) - server_cpu
                busy = (cpu_ticks()[0] - ticks[0]) / max(1, cpu_ticks()[1] - ticks[1])
                wall = out["end"] - out["start"]
                assert not out["cache_hit"], "a benchmark run found its features cached"
                stored = np.load(feats.entry_dir(layout.feature_cache, out["key"]) / feats.FEATURES_FILE)
                shutil.rmtree(layout.feature_cache)
                n_shards = len(feats.shard_bounds(rows, shard, batch))
                timing = shard_timings(n_shards, workers)
                row = {
                    "runner": kind,
                    "note": note,
                    "workers": workers,
                    "rows": rows,
                    "shard_rows": shard,
                    "shards": n_shards,
                    "wall_s": wall,
                    "img_s": rows / wall,
                    "img_s_per_worker": rows / wall / workers,
                    # The single-process run's bytes, or their first rows for a sweep on fewer rows.
                    "identical_to_single_process": stored.tobytes() == single.setdefault("features", stored)[:rows].tobytes(),
                    "identical_to_one_pass": stored.tobytes() == reference[:rows].tobytes(),
                    "sha256": hashlib.sha256(stored.tobytes()).hexdigest(),
                    "first_shard_after_s": timing["first_start"] - out["start"] if "first_start" in timing else None,
                    "merge_after_last_shard_s": out["end"] - timing["last_end"] if "last_end" in timing else None,
                    **{k: v for k, v in timing.items() if k not in ("first_start", "last_end")},
                    "loadavg_1min_before": load,
                    # CPU seconds the Prefect server spent during the run (outside the workers), and
                    # the share of the machine's CPU time that was busy (everyone's work).
                    "prefect_server_cpu_s": server_cpu,
                    "machine_cpu_busy": busy,
                }
                print(
                    f"{kind + (f' ({note})' if note else ''):>8} x{workers} shard {shard:>5}: {rows} rows in {wall:6.1f} s, {rows / wall:5.0f} img/s, "
                    f"{rows / wall / workers:5.0f} img/s per worker, first shard after {row['first_shard_after_s'] or float('nan'):.1f} s, "
                    f"utilisation {row.get('utilisation', float('nan')):.2f}, same bytes as single process: {row['identical_to_single_process']}",
                    flush=True,
                )
                runs.append(row)
                return row

            # Warm-up: the server's first flow and task runs, the page cache, two threads at once.
            for workers in (1, 2):
                stage(4 * batch, FeaturesConfig(batch_size=batch, shard_rows=batch, runner={"kind": "threads", "workers": workers}).model_dump_json())
                shutil.rmtree(layout.feature_cache)

            single: dict = {}  # the first run, threads x 1, is the single-process path
            run("threads", 1, args.headline_shard, args.rows)
            run("threads", 2, args.headline_shard, args.rows)
            startup.append(dask_startup(1))
            run("dask", 1, args.headline_shard, args.rows)
            startup.append(dask_startup(2))
            run("dask", 2, args.headline_shard, args.rows)
            for shard in shard_sizes:
                if shard == args.headline_shard and sweep_rows == args.rows:
                    continue
                for kind in ("threads", "dask"):
                    run(kind, 2, shard, sweep_rows)
            if sweep_rows < args.rows and args.headline_shard in shard_sizes:
                for kind in ("threads", "dask"):
                    run(kind, 2, args.headline_shard, sweep_rows)
            # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's
            # mmap threshold at 128 KiB: every activation buffer is then mmapped and page-faulted
            # anew. The stage's local cluster leaves it unset (tasks/runners.py); a cluster started
            # with Dask's defaults, reached by its address, shows what the variable costs. Its
            # start-up is outside the timed call: compare the median shard seconds.
            from distributed import LocalCluster

            saved = dict(os.environ)
            try:
                with LocalCluster(
                    n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, env={"PREFECT_API_URL": server.api_url}
                ) as cluster:
                    run("dask", 2, args.headline_shard, args.rows, note=DASK_DEFAULT_ENV, address=cluster.scheduler_address)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            drain_prefect()
    finally:
        server.stop()
        os.environ.pop("PREFECT_API_URL", None)
        shutil.rmtree(tmp, ignore_errors=True)

    identical = all(r["identical_to_single_process"] and r["identical_to_one_pass"] for r in runs)

    def headline(kind: str, workers: int) -> dict:
        return next(
            r
            for r in runs
            if r["runner"] == kind and r["workers"] == workers and r["shard_rows"] == args.headline_shard and r["rows"] == args.rows and not r["note"]
        )

    efficiency = {kind: headline(kind, 2)["img_s"] / (2 * headline(kind, 1)["img_s"]) for kind in ("threads", "dask")}
    # Per shard, as the default-env cluster's start-up is not inside its timed call.
    default_env = next(r for r in runs if r["note"] == DASK_DEFAULT_ENV)
    malloc_slowdown = default_env["shard_s"]["median"] / headline("dask", 2)["shard_s"]["median"]
    total_s = time.perf_counter() - bench_start
    result = {
        "backbone": args.backbone,
        "pretrained": cfg.pretrained,
        "image_size": args.size,
        "batch_size": batch,
        "rows": args.rows,
        "sweep_rows": sweep_rows,
        "headline_shard_rows": args.headline_shard,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "date": date,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "one_pass": {"rows": args.rows, "wall_s": one_pass_s, "img_s": args.rows / one_pass_s},
        "per_image_one_thread": per_image,
        "prefect_server_start_s": server_start_s,
        "dask_startup": startup,
        "runs": runs,
        "scaling_efficiency_2_workers": efficiency,
        "dask_default_env_shard_slowdown": malloc_slowdown,
        "all_identical": identical,
        "total_s": total_s,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    title = f"{args.backbone} at {args.size} px, {args.rows} images of 8x8, batch {batch}, on {cpu_model()} ({os.cpu_count()} cores), {date}"
    head = (
        "| runner | workers | rows | shard rows | shards | wall s | img/s | img/s per worker | first shard after s | median shard s "
        "| idle gap s | utilisation | Prefect server CPU s | machine busy | same bytes |"
    )
    table = [
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| one pass, no runner | 1 | {args.rows} | - | - | {one_pass_s:.1f} | {args.rows / one_pass_s:.0f} | {args.rows / one_pass_s:.0f} | - | - | - | - | - | - | reference |",
        *[
            f"| {r['runner']}{' (' + r['note'] + ')' if r['note'] else ''} | {r['workers']} | {r['rows']} | {r['shard_rows']} | {r['shards']} | {r['wall_s']:.1f} | {r['img_s']:.0f} | {r['img_s_per_worker']:.0f} "
            f"| {fmt(r['first_shard_after_s'], '.1f')} | {fmt(r.get('shard_s', {}).get('median'), '.2f')} | {fmt(r.get('gap_s_median'), '.2f')} "
            f"| {fmt(r.get('utilisation'), '.2f')} | {r['prefect_server_cpu_s']:.1f} | {r['machine_cpu_busy']:.2f} | {'yes' if r['identical_to_single_process'] else 'NO'} |"
            for r in runs
        ],
    ]
    md = [
        f"# Sharded feature extraction: {title}",
        "",
        "`python benchmarks/features.py " + " ".join(sys.argv[1:]) + "`",
        "",
        *table,
        "",
        "wall s: the `cached_features` call (key, shards, merge, entry written; for Dask, cluster start and stop too). "
        "first shard after s: from that call to the first shard's start. median shard s, idle gap s (between one worker's shards), "
        "utilisation (shard seconds / (workers x first start to last end)): from the shard task runs on the Prefect server. "
        "machine busy: share of all CPU time on the machine that was busy during the run.",
        "",
        "Scaling efficiency, 2 workers vs 1 (img/s of 2 / (2 x img/s of 1)), shards of "
        f"{args.headline_shard} rows: threads {efficiency['threads']:.2f}, dask {efficiency['dask']:.2f}. "
        f"Median shard seconds on 2 Dask workers started with Dask's default environment (MALLOC_TRIM_THRESHOLD_=65536), "
        f"against the stage's own cluster, which leaves it unset: {malloc_slowdown:.2f}x. "
        f"Every run's features.npy byte-identical to the single-process run's: {'yes' if identical else 'NO'}.",
        "",
        "| Dask LocalCluster alone | start s | workers import the stage s | stop s |",
        "|---|---:|---:|---:|",
        *[f"| {s['workers']} worker{'s' if s['workers'] > 1 else ''} | {s['start_s']:.1f} | {s['import_stage_s']:.1f} | {s['stop_s']:.1f} |" for s in startup],
        "",
        "| per image, one thread | ms | file bytes |",
        "|---|---:|---:|",
        *[f"| decode + resize to {args.size} px: {name} | {s * 1e3:.2f} | {per_image['file_bytes'][name]:.0f} |" for name, s in per_image["loader_s"].items()],
        *[f"| forward {args.backbone} at {size} px | {s * 1e3:.2f} | - |" for size, s in per_image["forward_s"].items()],
        "",
        f"Temporary Prefect server start {server_start_s:.1f} s. Whole benchmark {total_s / 60:.1f} min. "
        f"Load average (1 min) before {load_before:.2f}, after {result['loadavg_1min']['after']:.2f}.",
        "",
    ]
    print(f"\n{title}\n")
    print("\n".join(md[4:]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "features_scale.json", result)
    write_text(RESULTS / "features_scale.md", "\n".join(md))
    print(f"wrote {RESULTS / 'features_scale.json'} and {RESULTS / 'features_scale.md'}")
    if not identical:
        print("FAILED: some runs' features differ from the single-process run's", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="images: 2000, or 20000 with --scale")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader workers; several values are compared side by side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to extract (the stage: features.device, auto = cuda if present)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--photos", type=int, metavar="PX", help="photo-like RGB JPEGs of PX x PX instead of 8x8 PNGs; writes results/features_photos.{md,json}"
    )
    parser.add_argument("--scale", action="store_true", help="the sharded stage on threads and Dask runners, 1 and 2 workers (see above)")
    parser.add_argument("--shard-rows", type=int, nargs="+", default=[512, 2048, 8192], help="--scale: shard sizes compared with 2 workers")
    parser.add_argument("--headline-shard", type=int, default=2048, help="--scale: the shard size of the 1- vs 2-worker comparison")
    parser.add_argument("--sweep-rows", type=int, default=None, help="--scale: rows of the shard-size sweep (default --rows)")
    parser.add_argument("--decode-images", type=int, default=200, help="--scale: JPEGs of each size timed through the loader")
    args = parser.parse_args()
    if args.rows is None:
        args.rows = 20000 if args.scale else 2000
    if args.scale:
        sys.exit(scale_main(args))
    torch.set_num_threads(args.threads)
    device = args.device
    # A busy machine slows torch's threads many times over (they wait on each other); record the load.
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="xfer-bench-features-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        if args.photos:
            manifest = write_photos(root, args.rows, args.photos)
            images = f"photo-like JPEGs of {args.photos}x{args.photos}"
        else:
            manifest = write_images(root, args.rows)
            images = "PNGs of 8x8"
        print(f"wrote {args.rows} {images} in {time.perf_counter() - t0:.1f} s")

        cfg = backbone_config(args.backbone, args.size)
        model, prep, weights = create_backbone(cfg, num_classes=0)
        model = model.eval().to(device)
        data = ImageRows(manifest.path.tolist(), manifest.label.tolist(), prep, root)
        n = len(data)

        # (ii) the ceiling: the same batches, already tensors in memory.
        batches = [x for x, _ in DataLoader(data, batch_size=args.batch, shuffle=False)]
        batches = [x.to(device) for x in batches]

        @torch.inference_mode()
        def forward_only():
            for x in batches:
                model(x)
            sync(device)

        # The input side alone, with the loader settings extract uses.
        def loader_only(workers: int):
            for _ in feats.feature_loader(data, args.batch, device, workers):
                pass

        # (i) the features stage's path.
        def run_extract(workers: int, frame: pd.DataFrame = manifest):
            out = feats.extract(model, frame, prep, args.batch, root=root, device=device, progress=False, num_workers=workers)
            sync(device)
            return out

        # Warm-up: first-call allocations, oneDNN/cuDNN kernel choice, page cache.
        forward_only()
        for workers in args.workers:
            run_extract(workers, manifest.iloc[: min(n, 2 * args.batch)])
            loader_only(workers)

        # Rounds interleave every measurement, so a load that comes and goes on the
        # machine hits the ceiling and the extraction alike, not just one of them.
        times: dict[str, list[float]] = {}

        def timed(name: str, fn) -> None:
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)

        for _ in range(args.repeats):
            timed("forward", forward_only)
            for workers in args.workers:
                timed(f"extract{workers}", lambda: run_extract(workers))
                timed(f"loader{workers}", lambda: loader_only(workers))
        forward_s = statistics.median(times["forward"])
        extract_rows = []
        for workers in args.workers:
            extract_s = statistics.median(times[f"extract{workers}"])
            extract_rows.append(
                {
                    "workers": workers,
                    "extract_img_s": n / extract_s,
                    "loader_img_s": n / statistics.median(times[f"loader{workers}"]),
                    "ratio_to_forward": forward_s / extract_s,
                }
            )
        features = run_extract(args.workers[0])
        # The two paths must compute the same thing, or the ratio compares different work.
        with torch.inference_mode():
            reference = np.concatenate([model(x).float().cpu().numpy() for x in batches])
        np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4)

        # (iv) a cache hit: the entry exists; what does finding and opening it cost?
        cache = root / "cache"
        key = feats.cache_key(cfg.name, weights.digest, prep, manifest)
        meta = {"backbone": cfg.name, "weights_digest": weights.digest, "preprocessing": prep.as_dict()}
        feats.get_or_compute(cache, key, lambda: features, manifest, meta)

        def never():
            raise AssertionError("a cache hit ran compute")

        def lookup():
            entry, hit = feats.get_or_compute(cache, key, never, manifest, meta)
            assert hit
            return feats.load_entry(entry)

        def lookup_with_backbone():
            _, p, w = create_backbone(cfg, num_classes=0)
            k = feats.cache_key(cfg.name, w.digest, p, manifest)
            entry, hit = feats.get_or_compute(cache, k, never, manifest, meta)
            assert hit
            return feats.load_entry(entry)

        lookup(), lookup_with_backbone()  # warm-up
        hit_s = median_time(lookup, max(args.repeats, 5))
        hit_backbone_s = median_time(lookup_with_backbone, args.repeats)

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} torch threads, {os.cpu_count()} cores"
    result = {
        "backbone": args.backbone,
        "pretrained": cfg.pretrained,
        "rows": n,
        "image_size": args.size,
        "batch_size": args.batch,
        "device": where,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "forward_img_s": n / forward_s,
        "extract": extract_rows,
        "cache_hit_lookup_s": hit_s,
        "cache_hit_with_backbone_s": hit_backbone_s,
        "rounds_s": times,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }

    title = f"{args.backbone} at {args.size} px, {n} {images}, batch {args.batch}, on {where}"
    result["images"] = images
    name = "features_photos" if args.photos else "features"
    lines = [
        f"{'workers':>8}{'extract img/s':>15}{'loader img/s':>14}{'forward img/s':>15}{'ratio':>8}",
        *[f"{r['workers']:>8}{r['extract_img_s']:>15.0f}{r['loader_img_s']:>14.0f}{n / forward_s:>15.0f}{r['ratio_to_forward']:>8.2f}" for r in extract_rows],
        "",
        f"cache hit: get_or_compute + load_entry {hit_s * 1e3:.1f} ms; with create_backbone + cache_key first {hit_backbone_s * 1e3:.0f} ms",
        f"load average (1 min) before {result['loadavg_1min']['before']:.2f}, after {result['loadavg_1min']['after']:.2f}",
    ]
    print(f"\n{title}\n")
    print("\n".join(lines))

    RESULTS.mkdir(parents=True, exist_ok=True)
    from xfer.io import write_json, write_text

    write_json(RESULTS / f"{name}.json", result)
    md = [
        f"# Feature extraction: {title}",
        "",
        "`python benchmarks/features.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| workers | extract img/s | loader img/s | forward img/s (ceiling) | extract / forward |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['workers']} | {r['extract_img_s']:.0f} | {r['loader_img_s']:.0f} | {n / forward_s:.0f} | {r['ratio_to_forward']:.2f} |" for r in extract_rows],
        "",
        "| cache hit | seconds |",
        "|---|---:|",
        f"| get_or_compute + load_entry | {hit_s:.4f} |",
        f"| create_backbone + cache_key + get_or_compute + load_entry | {hit_backbone_s:.3f} |",
        "",
        f"Load average (1 min) before {result['loadavg_1min']['before']:.2f}, after {result['loadavg_1min']['after']:.2f} on {os.cpu_count()} cores.",
        "",
    ]
    write_text(RESULTS / f"{name}.md", "\n".join(md))
    print(f"\nwrote {RESULTS / f'{name}.json'} and {RESULTS / f'{name}.md'}")


if __name__ == "__main__":
    main()
