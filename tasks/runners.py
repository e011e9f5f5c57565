"""The Prefect task runner that `features.runner` in params.yaml names.

threads  Prefect's ThreadPoolTaskRunner: `workers` threads in this process.
dask     prefect-dask's DaskTaskRunner: the Dask scheduler at `address`, or a
         LocalCluster of `workers` processes with one thread each.
ray      prefect-ray's RayTaskRunner: the Ray cluster at `address`, or a local
         Ray instance with `workers` CPUs.

Task runs on a cluster's workers report to the Prefect server this process
talks to. A local cluster's workers are given its URL; without one each worker
process would start a temporary server of its own (seconds each). The workers
of a remote cluster need PREFECT_API_URL in their own environment
(docs/team-servers.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from typing import Iterator
from urllib.parse import urlsplit

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks import install_hint
from xfer.config import RunnerConfig

# The package each runner kind needs, for a clear error when it is not installed;
# pyproject.toml's extra of the same name as the kind installs it.
RUNNER_PACKAGES = {"dask": ("prefect_dask", "prefect-dask"), "ray": ("prefect_ray", "prefect-ray")}


class RunnerError(ValueError):
    """features.runner names a runner this environment cannot start."""


def check_params(params, root) -> None:
    """The runner `features.runner` names can start here (its package, its cluster)."""
    check_runner(params.features.runner)


def check_runner(cfg: RunnerConfig, timeout: float = 5.0) -> None:
    """Refuse a runner whose package is missing or whose cluster does not answer, before any work."""
    if cfg.kind in RUNNER_PACKAGES:
        module, dist = RUNNER_PACKAGES[cfg.kind]
        if importlib.util.find_spec(module) is None:
            raise RunnerError(f"features.runner.kind {cfg.kind!r} needs the {dist} package, not installed here: {install_hint(cfg.kind)}")
    if cfg.address and "://" in cfg.address:
        check_reachable(cfg.kind, cfg.address, timeout)


def check_reachable(kind: str, address: str, timeout: float) -> None:
    """A TCP connection to the cluster address opens: otherwise the stage would wait on it, then fail late."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise RunnerError(
            f"features.runner.address {address!r} needs a host and a port, e.g. {'tcp://scheduler:8786' if kind == 'dask' else 'ray://head:10001'}"
        )
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise RunnerError(f"features.runner.address {address!r}: no {kind} cluster answers there ({err.strerror or err})") from None


def prefect_api_url() -> str | None:
    """The URL of the Prefect server this process reports to, temporary or not."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    # No server configured: Prefect runs a temporary one in this process
    # (SubprocessASGIServer() is that singleton), which local workers can share.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if server.running else None


def worker_count(cfg: RunnerConfig) -> int:
    """Shards side by side: `workers`, or one per CPU core this process may use."""
    return cfg.workers or len(os.sched_getaffinity(0))


@contextlib.contextmanager
def shard_runner(cfg: RunnerConfig) -> Iterator[TaskRunner]:
    """The task runner for the shards, with this process's environment as it was afterwards.

    A local Dask cluster's nannies write their pre-spawn variables into the
    environment of the process that starts them, for good: OMP_NUM_THREADS=1
    would then reach every later child (torchrun workers of the finetune stage
    in the same pipeline process). And of those variables,
    MALLOC_TRIM_THRESHOLD_ is left out: setting it at all turns off glibc's
    adaptive mmap threshold, so each batch maps and faults in its activation
    buffers anew, and the workers ran 1.6x slower here (docs/scaling.md).
    """
    saved = dict(os.environ)
    try:
        if cfg.kind == "dask" and not cfg.address:
            import dask
            import distributed  # noqa: F401  (registers its config defaults; see below)

            # dask.config.set removes on exit every key that did not exist on entry: with
            # `distributed` not yet imported, that would be all of its defaults.
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                yield task_runner(cfg)
        elif cfg.kind == "ray" and not cfg.address:
            loopback_only_ray()
            yield task_runner(cfg)
        else:
            yield task_runner(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    check_runner(cfg)
    workers = worker_count(cfg)
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    url = prefect_api_url()
    env = {"PREFECT_API_URL": url} if url else {}
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                # No dashboard pages: nothing to look at in a batch job. The scheduler still serves its
                # health and metrics routes on 127.0.0.1:8787, or a random port if taken (docs/security.md).
                "dashboard_address": None,
                "env": env,
            },
        )
    from prefect_ray import RayTaskRunner

    if cfg.address:
        return RayTaskRunner(address=cfg.address)
    return RayTaskRunner(
        init_kwargs={
            "num_cpus": workers,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "runtime_env": {"env_vars": env},
        }
    )


def loopback_only_ray() -> None:
    """Make a local Ray instance started from this process listen on 127.0.0.1 only.

    Ray turns a loopback `_node_ip_address` into the machine's own address, then
    its GCS, raylet and agents listen there and on all interfaces. With Ray's
    "clusters" switch off (the variable is named for macOS and Windows, where
    it is off by default) the node's address is 127.0.0.1 and every daemon binds
    loopback, as benchmarks/binds.py measures (docs/security.md). A local
    instance is one machine, so nothing is lost. The daemons inherit the
    variable (shard_runner removes it afterwards); Ray's constant is set too,
    for this process, in case Ray was imported before the variable was set.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
