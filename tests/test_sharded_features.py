"""Sharded feature extraction over Prefect task runners: threads, Dask, Ray.

Every runner must give the features of one pass over the manifest, byte for
byte; a shard lost with its Dask worker is run again and changes nothing.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_PARAMS, write_params

from xfer import features as feats
from xfer.backbones import create_backbone
from xfer.config import BackboneConfig, ConfigError, parse_params
from xfer.data.split import read_manifest
from xfer.layout import Layout


def _params(**features) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["features"].update(features)
    return params


@pytest.fixture(scope="module")
def split_project(tmp_path_factory, prefect_api) -> Path:
    """Tiny digits fetched and split once; each test copies it."""
    from flows.stages import STAGE_FLOWS

    root = tmp_path_factory.mktemp("split")
    write_params(root, TINY_PARAMS)
    STAGE_FLOWS["fetch"](root=str(root))
    STAGE_FLOWS["split"](root=str(root))
    return root


def one_pass_features(root: Path, backbone: dict, batch_size: int) -> np.ndarray:
    """The reference: the backbone over the whole manifest in one `extract` call, in this process, no runner."""
    model, prep, _ = create_backbone(BackboneConfig(**backbone), num_classes=0)
    with feats.one_intra_op_thread():
        return feats.extract(model, read_manifest(Layout(root).manifest), prep, batch_size, root=root, progress=False)


@pytest.fixture(scope="module")
def one_pass(split_project) -> np.ndarray:
    return one_pass_features(split_project, TINY_PARAMS["backbone"], TINY_PARAMS["features"]["batch_size"])


def _project_with(split_project: Path, dest: Path, params: dict) -> Path:
    shutil.copytree(split_project, dest, ignore=shutil.ignore_patterns("features", "feature-cache", "mlflow.db", "mlartifacts"))
    write_params(dest, params)
    return dest


def _run_features(root: Path) -> tuple[dict, Path]:
    from flows.stages import STAGE_FLOWS

    result = STAGE_FLOWS["features"](root=str(root))
    return result, feats.entry_dir(Layout(root).feature_cache, result["key"])


def _assert_same_bytes(entry: Path, one_pass: np.ndarray) -> None:
    stored = np.load(entry / feats.FEATURES_FILE)
    assert stored.dtype == np.float32 and stored.shape == one_pass.shape
    assert stored.tobytes() == one_pass.tobytes()


def test_shards_cover_every_row_once_in_whole_batches():
    bounds = feats.shard_bounds(1000, 256, 64)
    assert bounds == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert feats.shard_bounds(256, 256, 64) == [(0, 256)]
    with pytest.raises(feats.FeatureCacheError, match="multiple of batch_size 64"):
        feats.shard_bounds(1000, 100, 64)


@pytest.mark.parametrize(
    "features, message",
    [
        ({"batch_size": 64, "shard_rows": 100}, "shard_rows 100 is not a multiple of batch_size 64"),
        ({"runner": {"kind": "threads", "address": "tcp://10.0.0.1:8786"}}, "needs kind dask or ray"),
        ({"runner": {"kind": "dask", "address": "ray://head:10001"}}, "is not a dask address"),
        ({"runner": {"kind": "spark"}}, "'threads', 'dask' or 'ray'"),
        ({"runner": {"kind": "dask", "workers": 0}}, "greater than or equal to 1"),
    ],
)
def test_bad_runner_params_are_refused_with_what_is_valid(features, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"features": features})


def test_default_threads_runner_gives_the_one_pass_features(tmp_path, split_project, one_pass):
    # Default params: a thread per core, shards of 1024 rows: the tiny manifest is one shard.
    root = _project_with(split_project, tmp_path / "p", TINY_PARAMS)
    result, entry = _run_features(root)
    assert not result["cache_hit"]
    _assert_same_bytes(entry, one_pass)
    # Shards are only the way to the entry: none are left once it is written.
    assert not feats.shards_dir(Layout(root).feature_cache, result["key"]).exists()


def test_many_shards_on_two_threads_give_the_one_pass_features(tmp_path, split_project):
    params = _params(batch_size=16, shard_rows=32, runner={"kind": "threads", "workers": 2})
    root = _project_with(split_project, tmp_path / "p", params)
    reference = one_pass_features(root, TINY_PARAMS["backbone"], 16)
    assert len(feats.shard_bounds(len(reference), 32, 16)) > 4
    _, entry = _run_features(root)
    _assert_same_bytes(entry, reference)


def test_dask_local_cluster_gives_byte_identical_features(tmp_path, split_project, one_pass):
    params = _params(shard_rows=64, runner={"kind": "dask", "workers": 2})
    root = _project_with(split_project, tmp_path / "p", params)
    assert len(feats.shard_bounds(len(one_pass), 64, 64)) >= 3
    result, entry = _run_features(root)
    _assert_same_bytes(entry, one_pass)
    assert not feats.shards_dir(Layout(root).feature_cache, result["key"]).exists()


def test_a_rerun_computes_only_the_shards_a_crash_left_missing(tmp_path, split_project, one_pass):
    """Shards written before a crash are kept; the rerun computes the rest and merges all."""
    from tasks.features import extract_shards

    params = _params(shard_rows=64)
    root = _project_with(split_project, tmp_path / "p", params)
    layout = Layout(root)
    cfg = parse_params(params).features
    manifest = read_manifest(layout.manifest)
    bounds = feats.shard_bounds(len(manifest), 64, 64)
    _, _, weights = create_backbone(BackboneConfig(**TINY_PARAMS["backbone"]), num_classes=0)
    shards = tmp_path / "shards"
    # A shard left from an earlier, interrupted run: recognisably not the backbone's numbers.
    (a, b) = bounds[1]
    marker = np.full((b - a, one_pass.shape[1]), 7.0, dtype=np.float32)
    feats.write_shard(feats.shard_path(shards, a, b), marker, b - a)
    # And a half-written one (a torn file): not a shard, so computed again.
    (c, d) = bounds[2]
    feats.shard_path(shards, c, d).write_bytes(b"\x93NUMPY trunc")
    computed = extract_shards(str(root), BackboneConfig(**TINY_PARAMS["backbone"]), weights.digest, manifest, cfg, str(shards))
    assert computed == len(bounds) - 1
    merged = feats.merge_shards(shards, bounds)
    expected = one_pass.copy()
    expected[a:b] = 7.0
    assert merged.tobytes() == expected.tobytes()


def test_a_worker_with_other_weights_is_refused(tmp_path, split_project):
    from tasks.features import feature_shard

    params = _params()
    root = _project_with(split_project, tmp_path / "p", params)
    manifest = read_manifest(Layout(root).manifest)
    out = tmp_path / "shard.npy"
    with pytest.raises(feats.FeatureCacheError, match="every worker needs the same weights files"):
        feature_shard.fn(str(root), BackboneConfig(**TINY_PARAMS["backbone"]), "0" * 64, manifest.iloc[:64], 64, 0, str(out))
    assert not out.exists()


def test_killing_a_dask_worker_mid_extraction_still_completes_with_identical_features(tmp_path, split_project):
    """Acceptance: SIGKILL one of two workers while it runs a shard; the stage still ends with the one-pass bytes."""
    from distributed import Client, LocalCluster

    # Shards slow enough (a larger image, small batches) that the kill lands inside one.
    backbone = {**TINY_PARAMS["backbone"], "image_size": 128}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
        params = _params(batch_size=8, shard_rows=8, runner={"kind": "dask", "address": cluster.scheduler_address})
        params["backbone"] = backbone
        root = _project_with(split_project, tmp_path / "p", params)
        reference = one_pass_features(root, backbone, 8)

        outcome: dict = {}
        stage = threading.Thread(target=lambda: outcome.update(zip(("result", "entry"), _run_features(root))))
        stage.start()
        shards_root = Layout(root).feature_cache
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and stage.is_alive():
            busy = {w: tasks for w, tasks in client.processing().items() if tasks}
            written = list(shards_root.glob(f"*{feats.SHARDS_SUFFIX}/rows-*.npy"))
            if busy and written:
                victim = next(iter(busy))
            else:
                time.sleep(0.05)
        assert victim is not None, "no shard was running on a worker to kill"
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        stage.join(timeout=300)
        assert not stage.is_alive()
        assert "entry" in outcome, "the features stage failed after the worker was killed"
        _assert_same_bytes(outcome["entry"], reference)
        # The shards on the killed worker went back to the scheduler when it died and finished elsewhere.
        story = [t for t in client.story(*busy[victim]) if t[0] == "scheduler"]
        lost = {t[1] for t in story if t[2:4] == ("processing", "released") and t[5].startswith("handle-worker-cleanup")}
        assert lost, "the scheduler never saw a shard lost with its worker"
        finished = {t[1] for t in story if t[2:4] == ("processing", "memory")}
        assert lost <= finished


def test_a_failing_shard_is_retried_alone_and_the_finished_ones_are_kept(tmp_path, split_project, one_pass):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.features import extract_shards

    params = _params(shard_rows=64, runner={"kind": "threads", "workers": 2, "retries": 1})
    root = _project_with(split_project, tmp_path / "p", params)
    cfg = parse_params(params).features
    manifest = read_manifest(Layout(root).manifest)
    bounds = feats.shard_bounds(len(manifest), 64, 64)
    _, _, weights = create_backbone(BackboneConfig(**TINY_PARAMS["backbone"]), num_classes=0)
    shards = tmp_path / "shards"
    # One unreadable image in the second shard.
    bad = root / manifest.path.iloc[bounds[1][0] + 3]
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"not an image")
    args = (str(root), BackboneConfig(**TINY_PARAMS["backbone"]), weights.digest, manifest, cfg, str(shards))

    state = extract_shards(*args, return_state=True)
    assert state.is_failed()
    assert "cannot read image" in str(state.message) or "cannot read image" in repr(state.result(raise_on_failure=False))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shard_runs = sorted((r.run_count, r.state.type.value) for r in runs if r.name.startswith("feature-shard"))
    # The failing shard ran twice (1 retry) and failed; every other shard ran once.
    assert shard_runs == sorted([(2, "FAILED")] + [(1, "COMPLETED")] * (len(bounds) - 1))
    kept = [(a, b) for a, b in bounds if feats.shard_path(shards, a, b).is_file()]
    assert kept == [s for s in bounds if s != bounds[1]]

    bad.write_bytes(good_bytes)
    assert extract_shards(*args) == 1
    assert feats.merge_shards(shards, bounds).tobytes() == one_pass.tobytes()


def test_ray_local_instance_gives_byte_identical_features(tmp_path, split_project, one_pass):
    params = _params(shard_rows=64, runner={"kind": "ray", "workers": 2})
    root = _project_with(split_project, tmp_path / "p", params)
    result, entry = _run_features(root)
    assert not result["cache_hit"]
    _assert_same_bytes(entry, one_pass)


def test_dask_workers_report_to_the_stage_processes_own_temporary_server(tmp_path, split_project, one_pass):
    """`python -m flows.stages features` with no Prefect server configured: one temporary server, not one per worker."""
    import subprocess
    import sys

    root = _project_with(split_project, tmp_path / "p", _params(shard_rows=64, runner={"kind": "dask", "workers": 2}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.stages", "features", "--root", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("Starting temporary server") == 1, log[-3000:]
    assert log.count("Finished in state Completed") >= 3  # the shard tasks ran and reported
    key = json.loads((Layout(root).features_current / feats.META_FILE).read_text())["key"]
    _assert_same_bytes(feats.entry_dir(Layout(root).feature_cache, key), one_pass)
    _assert_same_bytes(Layout(root).features_current, one_pass)


def test_a_cluster_address_nothing_answers_stops_the_stage_before_any_work(tmp_path, capsys):
    from helpers import free_port

    from flows.stages import check_params

    address = f"tcp://127.0.0.1:{free_port()}"
    write_params(tmp_path, _params(runner={"kind": "dask", "address": address}))
    assert not check_params(str(tmp_path))
    err = capsys.readouterr().err
    assert f"features.runner.address '{address}': no dask cluster answers there" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def _worker_environment(names: tuple[str, ...]) -> dict:
    return {n: os.environ.get(n) for n in names}


def test_a_local_dask_cluster_leaves_this_process_environment_as_it_was(prefect_api):
    """Workers start without MALLOC_TRIM_THRESHOLD_ (1.6x slower with it) and nothing leaks into the caller."""
    from prefect import flow, task

    from tasks.runners import shard_runner
    from xfer.config import RunnerConfig

    names = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PREFECT_API_URL")
    probe = task(_worker_environment)

    @flow
    def on_workers() -> list[dict]:
        return [f.result() for f in probe.map([names, names])]

    before = dict(os.environ)
    with shard_runner(RunnerConfig(kind="dask", workers=2)) as runner:
        seen = on_workers.with_options(task_runner=runner)()
    assert os.environ == before
    assert all(env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": prefect_api} for env in seen), seen


def test_pulled_outputs_refill_the_cache_without_a_forward_pass(tmp_path, split_project, one_pass):
    """A clone after `dvc pull`: the published features, an empty cache, and here no images either."""
    root = _project_with(split_project, tmp_path / "p", TINY_PARAMS)
    first, _ = _run_features(root)
    shutil.rmtree(Layout(root).feature_cache)
    shutil.rmtree(Layout(root).raw)  # any forward pass would fail to read its images
    again, entry = _run_features(root)
    assert again["key"] == first["key"] and not again["cache_hit"]
    _assert_same_bytes(entry, one_pass)
    assert feats.entry_problem(entry) is None
