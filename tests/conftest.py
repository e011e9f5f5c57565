"""Shared fixtures: tiny params, a project folder, an isolated Prefect."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its home at import: give the tests their own, never the user's.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="xfer-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("XFER_PIPELINE_RUN_ID", None)
# A temporary Prefect server that a stage process starts for itself may take longer than
# Prefect's 20 s to answer on a 2-core machine busy with a Dask cluster (seen in CI).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# No telemetry: the tests run offline.
os.environ.update(DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true")

from helpers import TINY_PARAMS, write_params  # noqa: E402

# `make test-fast` (pytest -m core): the core package's unit tests, which run no stage,
# no pipeline and no server (tests/test_contract.py checks that these modules import
# nothing from tasks/, flows/, prefect or mlflow).
CORE_TEST_MODULES = {
    "test_adapt", "test_archives", "test_augment", "test_backbones", "test_config", "test_diagnostics", "test_drift",
    "test_digits", "test_download", "test_features", "test_fetch", "test_finetune", "test_heads", "test_io",
    "test_hub_weights", "test_importance", "test_metrics", "test_split", "test_suggest", "test_torchvision_sets", "test_transferability", "test_translate", "test_translate_stage",
}  # fmt: skip


def pytest_ignore_collect(collection_path: Path, config):
    """Under `-m core` alone, the other test modules are not imported at all: they hold no core
    test, and importing them (Prefect, MLflow and the stages) took about 4 s of every inner loop."""
    if config.option.markexpr == "core" and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return collection_path.stem not in CORE_TEST_MODULES or None
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module is not None and item.module.__name__ in CORE_TEST_MODULES:
            item.add_marker(pytest.mark.core)


@pytest.fixture
def tiny_params() -> dict:
    import copy

    return copy.deepcopy(TINY_PARAMS)


@pytest.fixture
def project(tmp_path: Path, tiny_params: dict) -> Path:
    """An empty project root holding tiny params.yaml."""
    write_params(tmp_path, tiny_params)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect engine against a temporary server, shared by the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, prefect_api):
    """Tiny params run once through `flows.pipeline`: (root, flow result)."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    write_params(root, TINY_PARAMS)
    return root, pipeline(root=str(root))
