"""The promotion rule and its concurrency: who holds @champion after evaluate registers a version.

A new version (the challenger) takes `@champion` only if its figure is
strictly higher than the champion's; otherwise it gets `@challenger`; ties
keep the champion (tasks/registry.py says which figure). Read the champion,
register, set the alias: two evaluate runs doing this at once would both read
the same champion (or none), both take @champion, and the last one would win,
better or not. So in a local sqlite store the three steps hold a lock file
beside the database; in a server store, which no lock here reaches, the
champion is checked after it is set and moved to the best version promoted
(settle()).

MLflow only, no torch: the race tests start processes that import it.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from xfer.locks import file_lock

CHAMPION = "champion"
CHALLENGER = "challenger"

# Which kind of figure decided a promotion, as the run, its report and promotion.json say it.
BY_TARGET_LABELS = "target val labels"
BY_VALIDATOR = "a validator, no target label read"


@dataclass(frozen=True)
class Promotion:
    model_name: str
    version: str
    metric: str
    challenger: float
    champion: float | None
    champion_version: str | None
    promoted: bool
    reason: str
    kind: str  # BY_TARGET_LABELS or BY_VALIDATOR

    @property
    def alias(self) -> str:
        return CHAMPION if self.promoted else CHALLENGER

    def as_dict(self) -> dict:
        return {**asdict(self), "alias": self.alias}


def decide(challenger: float, champion: float | None) -> tuple[bool, str]:
    """Promote only a strictly better challenger; the first version is promoted."""
    if champion is None:
        return True, "no champion yet"
    if challenger > champion:
        return True, f"challenger {challenger:.4f} > champion {champion:.4f}"
    return False, f"challenger {challenger:.4f} <= champion {champion:.4f} (ties keep the champion)"


def champion_figure(client: MlflowClient, name: str, metric: str) -> tuple[float | None, str | None]:
    """The current champion's figure for `metric` and its version; (None, None) if there is none."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model yet, or no version holds the alias
        return None, None
    value = champion.tags.get(metric)
    # A champion registered without this metric cannot be compared: it is replaced.
    return (float(value) if value is not None else None), champion.version


def promote(name: str, model_uri: str, metric: str, challenger: float, kind: str, tags: dict[str, str]) -> Promotion:
    """Register `model_uri` as a new version of `name` and give it @champion or @challenger.

    Read the champion, register, set the alias: two evaluate runs doing this at
    once would both read the same champion (or none) and both take @champion,
    the last one winning, better or not. In the project's sqlite store the
    three steps hold a lock file beside the database (`mlflow.db.lock`); the
    kernel frees it if the process dies. A server store cannot be locked from
    here, so after setting the alias the champion is checked against every
    version promoted by the same metric (settle()), and moved to the best.
    """
    client = MlflowClient()
    lock = store_lock_path(mlflow.get_tracking_uri())
    with (
        file_lock(lock, on_wait=lambda pid: print(f"waiting for another promotion (pid {pid or 'unknown'}) holding {lock}", flush=True))
        if lock
        else contextlib.nullcontext()
    ):
        champion, champion_version = champion_figure(client, name, metric)
        registered = mlflow.register_model(model_uri, name, tags={**tags, PROMOTION_METRIC_TAG: metric})
        promoted, reason = decide(challenger, champion)
        decision = Promotion(name, str(registered.version), metric, challenger, champion, champion_version, promoted, reason, kind)
        # The tag first: a concurrent settle() counts this version from the moment it may hold @champion.
        client.set_model_version_tag(name, decision.version, "promotion", decision.alias)
        client.set_registered_model_alias(name, decision.alias, decision.version)
    if lock is None and decision.promoted:
        decision = settle(client, decision)
    return decision


# The metric a version was compared by: settle() compares only versions promoted by the same one.
PROMOTION_METRIC_TAG = "promotion.metric"
SETTLE_ATTEMPTS = 5


def store_lock_path(tracking_uri: str) -> Path | None:
    """The lock file beside a local sqlite store's database; None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine.url import make_url

    database = make_url(tracking_uri).database
    if not database or database == ":memory:":
        return None
    return Path(database).with_name(Path(database).name + ".lock")


def best_promoted(client: MlflowClient, name: str, metric: str) -> tuple[str, float] | None:
    """(version, figure) of the best version promoted by `metric` since the promotion metric last changed.

    Promoted one after another, each of those beat the champion before it, so
    the best of them is the champion a serial history would have; equal
    figures go to the earlier version (ties keep the champion).
    """
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    best = None
    for v in versions:
        if v.tags.get("promotion") != CHAMPION:
            continue
        if v.tags.get(PROMOTION_METRIC_TAG, metric) != metric:
            best = None  # promoted by another metric: the history by this one starts again after it
            continue
        figure = v.tags.get(metric)
        if figure is not None and (best is None or float(figure) > best[1]):
            best = (str(v.version), float(figure))
    return best


def settle(client: MlflowClient, decision: Promotion) -> Promotion:
    """Compare after set, for a store no lock covers: @champion ends on the best promoted version.

    A concurrent evaluate that read the champion before this one registered
    may have set @champion after this one did, on a worse version: move it
    back (bounded; every one that promotes does the same after its own set).
    If another version is better than this one, this one's promotion is
    undone: it takes @challenger and its decision says why.
    """
    name = decision.model_name
    best = None
    for _ in range(SETTLE_ATTEMPTS):
        best = best_promoted(client, name, decision.metric)
        if best is None:
            break
        try:
            holder = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            holder = None
        if holder == best[0]:
            break
        client.set_registered_model_alias(name, CHAMPION, best[0])
    if best is None or best[0] == decision.version:
        return decision
    client.set_model_version_tag(name, decision.version, "promotion", CHALLENGER)
    client.set_registered_model_alias(name, CHALLENGER, decision.version)
    reason = f"challenger {decision.challenger:.4f} <= version {best[0]} promoted at the same time, {best[1]:.4f} (ties keep the earlier)"
    return replace(decision, promoted=False, reason=reason, champion=best[1], champion_version=best[0])
