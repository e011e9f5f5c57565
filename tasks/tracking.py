"""MLflow: one run per stage execution, grouped under one pipeline run.

The store is a sqlite file in the project root with artifacts beside it, so
`make ui` and any script see the same runs. With XFER_TRACKING_URI set (a
team's `http://mlflow.team:5000`, or a database URI such as
`postgresql://user@host/db`) every stage, the registry, `xfer predict` and
retraining use that store instead, and experiments xfer creates there get the
server's artifact root, not a folder of this machine (docs/team-servers.md).
MLFLOW_TRACKING_URI is deliberately not read: `mlflow.set_tracking_uri`
exports it to every child process, so it would leak one project's store into
another's.

The project's sqlite file is checked before MLflow opens it (check_local_store):
an empty or damaged file stops the stage with what to do, since MLflow would
otherwise create a fresh store in an empty one and every run and registered
model would be gone; a store of an older MLflow schema is copied to
`mlflow.db.schema-<revision>.bak` and then migrated.

Grouping: `flows.pipeline` creates a fresh pipeline run and hands its id to
the stages through XFER_PIPELINE_RUN_ID. Under `dvc repro` each stage is its
own process; then the pipeline run is the one keyed by the params and the
git commit, created by whichever stage runs first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks import install_hint
from xfer.config import Params, flatten
from xfer.contract import stage_params
from xfer.io import sha256_file, sha256_json
from xfer.layout import Layout
from xfer.procs import is_dead, process_identity
from xfer.redact import redact_url, split_userinfo

PIPELINE_RUN_ENV = "XFER_PIPELINE_RUN_ID"
TRACKING_URI_ENV = "XFER_TRACKING_URI"
TAG_KIND = "xfer.kind"
TAG_PIPELINE_KEY = "xfer.pipeline_key"
TAG_STAGE = "xfer.stage"
PARENT_TAG = "mlflow.parentRunId"
# Who runs a stage's MLflow runs (host, pid, process start time), and for which stage:
# a run left RUNNING by a killed process is marked FAILED by the next run of that stage.
TAG_OWNER_STAGE = "xfer.owner.stage"
TAG_OWNER_HOST = "xfer.owner.host"
TAG_OWNER_PID = "xfer.owner.pid"
TAG_OWNER_START = "xfer.owner.start"


log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"


class TrackingURIError(ValueError):
    """XFER_TRACKING_URI names no store MLflow can track to; the message says what is wrong."""


class TrackingStoreError(ValueError):
    """The project's MLflow store file exists but cannot be used as it is; the message says what to do."""


def redacted(uri: str) -> str:
    """`uri` with any password or token replaced by ***, for messages and logs (xfer.redact)."""
    return redact_url(uri)


def check_tracking_uri(uri: str) -> str:
    """`uri` if MLflow has a tracking store for its scheme; else TrackingURIError naming it."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.uri import get_uri_scheme

    where = f"{TRACKING_URI_ENV}={redacted(uri)!r}"
    example = "e.g. http://mlflow.team:5000 or postgresql://user@host:5432/mlflow"
    if "://" not in uri and uri not in ("databricks", "databricks-uc", "uc"):
        raise TrackingURIError(f"{where} is not a URI (no scheme://); {example}")
    try:
        scheme = get_uri_scheme(uri)
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException as err:
        supported = sorted(s for s in getattr(err, "supported_uri_schemes", []) if s)
        listed = f"; MLflow tracks to {', '.join(supported)}" if supported else f": {err.message}"
        raise TrackingURIError(f"{where}: MLflow has no tracking store for the scheme {urlparse(uri).scheme!r}{listed} ({example})") from None
    if scheme in ("http", "https") and not urlparse(uri).hostname:
        raise TrackingURIError(f"{where} names no host; {example}")
    if scheme in ("postgresql", "mysql", "mssql"):
        check_database_driver(uri, where)
    return uri


def check_database_driver(uri: str, where: str) -> None:
    """The SQLAlchemy driver a database URI selects must be installed (no store is opened)."""
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(uri).get_dialect()
    except (ArgumentError, NoSuchModuleError) as err:
        raise TrackingURIError(f"{where}: {err}") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise TrackingURIError(
            f"{where}: its database driver {dialect.driver!r} is not installed ({err}); {driver_hint(dialect.name, dialect.driver)}"
        ) from None


def driver_hint(database: str, driver: str) -> str:
    """What to do about a missing database driver: the `team` extra installs psycopg2."""
    if database != "postgresql":
        return f"install the Python package that provides {driver!r}"
    if driver != "psycopg2":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this project installs psycopg2.
        return "write postgresql+psycopg2://..., the driver the `team` extra installs"
    return f"psycopg2-binary is in the `team` extra: {install_hint('team')}"


def team_tracking_uri() -> str | None:
    """XFER_TRACKING_URI, checked, or None when it is unset or empty (the project's own store).

    An http(s) URI's user name and password are moved into MLflow's own
    variables (without_credentials) and the URI comes back without them.
    """
    value = os.environ.get(TRACKING_URI_ENV, "").strip()
    return without_credentials(check_tracking_uri(value)) if value else None


def without_credentials(uri: str) -> str:
    """`uri` without its user:password@, which go to MLFLOW_TRACKING_USERNAME / _PASSWORD instead
    (a user name alone, https://TOKEN@host, to MLFLOW_TRACKING_TOKEN).

    MLflow sends those as HTTP basic auth; a URI that carried them would be
    printed ("View run ... at: <uri>"), written into report links and logged.
    The variables live in this process (and its children) only, never in a file.
    Database URIs keep theirs: the driver needs it (use ~/.pgpass or PGPASSWORD instead).
    """
    if urlparse(uri).scheme.lower() not in ("http", "https"):
        return uri
    bare, user, password = split_userinfo(uri)
    if user is None:
        return uri
    if password is None:  # https://TOKEN@host: a bearer token
        os.environ["MLFLOW_TRACKING_TOKEN"] = user
    else:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return bare


def store_revision(path: Path) -> str | None:
    """The schema revision of the MLflow sqlite store at `path` (None: no file, or no MLflow tables yet).

    TrackingStoreError, naming the file and what to do, when it exists but is empty,
    not SQLite or damaged (PRAGMA quick_check: a few ms for a store of a few MB).
    MLflow would create a new, empty store in a zero-length file: every run and the
    registry would be gone without a word.
    """
    path = Path(path)
    if not path.exists():
        return None
    keep = f"restore it from a backup, or move it away to start a new, empty store (mv {path} {path}.broken); xfer does not touch it until then"
    if not path.is_file():
        raise TrackingStoreError(f"the MLflow store {path} is not a file; {keep}")
    if path.stat().st_size == 0:
        raise TrackingStoreError(f"the MLflow store {path} is empty (0 bytes): its runs and registered models are gone from it; {keep}")
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise TrackingStoreError(f"the MLflow store {path} is not an SQLite database; {keep}")
    try:
        con = sqlite3.connect(str(path))
        try:
            check = [row[0] for row in con.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise TrackingStoreError(f"the MLflow store {path} is damaged ({'; '.join(map(str, check[:3]))}); {keep}")
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = con.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise TrackingStoreError(f"the MLflow store {path} is damaged ({err}); {keep}") from None
    return row[0] if row else None


def check_local_store(path: Path, migrate: bool = True) -> None:
    """Stop (TrackingStoreError) if the project's store at `path` is empty or damaged; migrate an old schema.

    Before a migration the store is copied whole (SQLite's backup API) to
    `<name>.schema-<revision>.bak` beside it. A schema this MLflow does not know
    (written by a newer MLflow) is an error. With `migrate=False` (flows.stages --check)
    only the file itself is checked: the schema needs alembic, seconds to import.
    """
    path = Path(path)
    revision = store_revision(path)
    if revision is None or not migrate:
        return
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    head = _get_latest_schema_revision()
    if revision == head:
        return
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        known = ScriptDirectory.from_config(_get_alembic_config(db_url="")).get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise TrackingStoreError(
            f"the MLflow store {path} has schema revision {revision}, which this MLflow ({mlflow.__version__}, schema {head}) does not know: "
            "it was written by a newer MLflow; install that version, or move the store away to start a new one"
        )
    backup = path.with_name(f"{path.name}.schema-{revision}.bak")
    if not backup.exists():
        tmp = backup.with_name(f".{backup.name}.tmp")
        tmp.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(str(path))) as src, contextlib.closing(sqlite3.connect(str(tmp))) as dst:
            src.backup(dst)
        os.replace(tmp, backup)
    log.warning(
        "the MLflow store %s has schema %s, MLflow %s needs %s: migrating it; the store as it was is kept in %s",
        path,
        revision,
        mlflow.__version__,
        head,
        backup,
    )
    from mlflow.store.db.utils import _upgrade_db, create_sqlalchemy_engine_with_retry

    engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{path.resolve()}")
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()


def tracking_uri(layout: Layout) -> str:
    """The MLflow store every stage writes: XFER_TRACKING_URI if set, else the project's sqlite file (checked first)."""
    team = team_tracking_uri()
    if team:
        return team
    check_local_store(layout.mlflow_db)
    return f"sqlite:///{layout.mlflow_db.resolve()}"


def default_model_uri(layout: Layout) -> str:
    """The registered champion, `models:/<registry.name>@champion`: what `xfer predict` and the monitor use unless told."""
    from xfer.config import load_params

    return f"models:/{load_params(layout.params).registry.name}@champion"


def load_model(uri: str, store: str):
    """The MLflow pyfunc model at `uri` in the store `store`."""
    mlflow.set_tracking_uri(store)
    return mlflow.pyfunc.load_model(uri)


def use_store(layout: Layout, experiment: str) -> str:
    """Point MLflow at the store (tracking_uri); return the experiment id, creating the experiment if new.

    In the project's store a new experiment keeps its artifacts in
    <root>/mlartifacts; in a team store (XFER_TRACKING_URI) it gets the
    store's default artifact root (a server's --artifacts-destination).
    """
    team = team_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri(layout))
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    if team is not None:
        return client.create_experiment(experiment)
    layout.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(experiment, artifact_location=layout.mlflow_artifacts.resolve().as_uri())


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": dirty}


def data_digest(layout: Layout) -> str | None:
    """The manifest's sha256: names exactly which images, labels and splits a run saw."""
    return sha256_file(layout.manifest) if layout.manifest.is_file() else None


def pipeline_key(params: Params, commit: str) -> str:
    return sha256_json({"params": params.model_dump(mode="json"), "commit": commit})[:16]


def start_pipeline_run(layout: Layout, params: Params, experiment_id: str, key: str, git: dict) -> str:
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline-{key[:8]}",
        tags={TAG_KIND: "pipeline", TAG_PIPELINE_KEY: key, **git},
    )
    for name, value in flatten(params.model_dump(mode="json")).items():
        client.log_param(run.info.run_id, name, value)
    # Children attach by tag, so the parent need not stay open.
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def resolve_pipeline_run(layout: Layout, params: Params, experiment_id: str, git: dict) -> str:
    run_id = os.environ.get(PIPELINE_RUN_ENV)
    if run_id:
        return run_id
    key = pipeline_key(params, git["git_commit"])
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}' and tags.`{TAG_KIND}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    return start_pipeline_run(layout, params, experiment_id, key, git)


# What MLflow accepts in one dot-separated part of a metric key (mlflow.utils.validation).
_METRIC_KEY_PART = re.compile(r"[\w\- :/]*")
_METRIC_KEY_BAD = re.compile(r"[^\w\-]")


def metric_key(key: str) -> str:
    """`key` as a valid MLflow metric key: the one place class and domain names become keys.

    A part (between dots) MLflow would refuse, such as the class `a+b`, keeps its
    allowed characters, the rest as `_`, plus a digest of the part itself:
    `a_b-<8 hex>`. Deterministic, so every run and stage names a class alike, and
    two names that differ never share a key. Valid keys (`NA`, `café au lait`) are kept.
    """
    parts = key.split(".")
    out = []
    for part in parts:
        if _METRIC_KEY_PART.fullmatch(part) and part.strip(" /") == part:
            out.append(part)
        else:
            digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            out.append(_METRIC_KEY_BAD.sub("_", part) + f"-{digest}")
    return ".".join(out)


def metric_keys(metrics: dict[str, float]) -> dict[str, float]:
    """metrics with every key through metric_key; ValueError if two keys would become one."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        new = metric_key(key)
        if new in out:
            raise ValueError(f"metric keys {key!r} and another both become {new!r} in MLflow")
        out[new] = value
    return out


class StageRun:
    """The active MLflow run of one stage, with the timings the benchmark reads."""

    def __init__(self, run: mlflow.ActiveRun, stage: str = ""):
        self.run = run
        self.stage = stage
        self.run_id = run.info.run_id
        self.work_seconds = 0.0
        self.tags: dict[str, str] = {}

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """Time the stage's real work, so tracking overhead is what is left."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.work_seconds += time.perf_counter() - start

    def epoch_logger(self, prefix: str):
        def log(epoch: int, record: dict[str, float]) -> None:
            mlflow.log_metrics(metric_keys({f"{prefix}.{k}": float(v) for k, v in record.items()}), step=epoch)

        return log

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        flat = flatten(metrics)
        mlflow.log_metrics(metric_keys({f"{prefix}{k}": float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)
        mlflow.set_tags(tags)

    def child_run(self, name: str, params: dict[str, Any], metrics: dict[str, Any]) -> None:
        """A finished child run under this stage's run (one candidate of a search): its params and numbers."""
        # In the stage run's experiment: without it MLflow files the child under the default one.
        tags = {TAG_KIND: "candidate", **owner_tags(self.stage)}
        with mlflow.start_run(experiment_id=self.run.info.experiment_id, run_name=name, nested=True, tags=tags):
            mlflow.log_params(params)
            self.log_metrics(metrics)


# Mappings whose keys are the user's folder and class names: logged whole, as JSON,
# since MLflow param keys allow only a few characters.
USER_KEYED = (("data", "domains"), ("data", "classes", "rename"))


def loggable_params(section: dict[str, Any]) -> dict[str, Any]:
    """flatten(section), with user-keyed mappings as one JSON value each."""
    section = json.loads(json.dumps(section))
    for path in USER_KEYED:
        parent = section
        for key in path[:-1]:
            parent = parent.get(key, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict) and isinstance(parent.get(path[-1]), dict):
            parent[path[-1]] = json.dumps(parent[path[-1]], sort_keys=True)
    return flatten(section)


def owner_tags(stage: str) -> dict[str, str]:
    """Tags naming this process as the owner of a run of `stage`."""
    me = process_identity()
    return {TAG_OWNER_STAGE: stage, TAG_OWNER_HOST: me["host"], TAG_OWNER_PID: me["pid"], TAG_OWNER_START: me["start"]}


def fail_orphaned_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark FAILED the runs of `stage` left RUNNING by a process that has died; return their ids.

    Only runs whose owner tags name a process on this host that is gone (or whose
    pid now belongs to another process): a run of a concurrent live process, or
    one from another machine, is left alone.
    """
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_OWNER_STAGE}` = '{stage}'",
        max_results=1000,
    )
    failed = []
    for run in found:
        tags = run.data.tags
        if is_dead(tags.get(TAG_OWNER_HOST), tags.get(TAG_OWNER_PID), tags.get(TAG_OWNER_START)):
            client.set_tag(run.info.run_id, "xfer.failed_reason", f"its process {tags.get(TAG_OWNER_PID)} died (found by the next {stage} run)")
            client.set_terminated(run.info.run_id, "FAILED")
            failed.append(run.info.run_id)
    return failed


@contextlib.contextmanager
def stage_run(stage: str, layout: Layout, params: Params) -> Iterator[StageRun]:
    """An MLflow run for `stage`, nested under the pipeline run, with the params the
    stage reads (xfer/contract.py: the same keys as its dvc.yaml `params`) logged."""
    entered = time.perf_counter()
    experiment_id = use_store(layout, params.mlflow.experiment)
    git = git_state(layout.root)
    fail_orphaned_runs(experiment_id, stage)
    parent = resolve_pipeline_run(layout, params, experiment_id, git)
    tags = {TAG_KIND: "stage", TAG_STAGE: stage, PARENT_TAG: parent, **git, **owner_tags(stage)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params(loggable_params(stage_params(params, stage)))
        handle = StageRun(run, stage)
        yield handle
        # Read after the work: the split stage's own manifest, not the one it replaced.
        if "data_digest" not in handle.tags and (digest := data_digest(layout)):
            mlflow.set_tag("data_digest", digest)
        total = time.perf_counter() - entered
        mlflow.log_metrics({"time.work_s": handle.work_seconds, "time.tracking_s": total - handle.work_seconds})
