"""Prefect tasks, one module per stage: file IO, MLflow logging, progress.

Each task reads its inputs from files, calls into `xfer` for the work, and
writes files; results returned to Prefect stay small (paths, numbers).
"""

import os

# Offline by default: Prefect, MLflow and Ray would otherwise phone home for
# telemetry. Set before either is imported; a user's own setting wins.
for _name, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_name, _value)


def install_hint(extra: str) -> str:
    """How to install one of pyproject.toml's extras (dask, ray, team), from an index or a checkout."""
    return f"pip install 'xfer[{extra}]' (in a checkout: pip install --constraint requirements.lock -e '.[{extra}]')"
