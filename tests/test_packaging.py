"""What only some users need is an extra: pinned like the lock, installed by `make test`, named when missing."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib

import pytest
from helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# What each extra is for, and the packages that must live there rather than in the core.
OPTIONAL = {"dask": {"prefect-dask"}, "ray": {"prefect-ray"}, "team": {"psycopg2-binary", "boto3"}}


def pins(requirements: list[str]) -> dict[str, str]:
    """name -> version of each `name==version` (comments and markers dropped)."""
    out = {}
    for line in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            out[match.group(1).lower()] = match.group(2)
    return out


def test_optional_packages_are_extras_not_core_dependencies():
    core = pins(PYPROJECT["project"]["dependencies"])
    for extra, packages in OPTIONAL.items():
        assert packages <= set(pins(EXTRAS[extra])), f"extra {extra!r} lacks {packages - set(pins(EXTRAS[extra]))}"
        assert not packages & set(core), f"{packages & set(core)} must not be core dependencies"
    assert set(EXTRAS["all"]) == {f"xfer[{','.join(OPTIONAL)}]"}


def test_every_pin_in_pyproject_is_the_locks():
    lock = pins((REPO / "requirements.lock").read_text().splitlines())
    declared = pins(PYPROJECT["project"]["dependencies"] + [r for reqs in EXTRAS.values() for r in reqs])
    differ = {name: (version, lock.get(name)) for name, version in declared.items() if lock.get(name) != version}
    assert differ == {}, "pyproject pin -> requirements.lock pin"


def test_make_test_installs_every_extra_and_make_run_none():
    makefile = (REPO / "Makefile").read_text()
    test_install = re.search(r"^\$\(TEST_STAMP\):.*?--editable '\.\[([a-z,]+)\]'", makefile, re.S | re.M)
    assert test_install, "the test install line is not in the Makefile"
    assert set(test_install.group(1).split(",")) == {"test", *OPTIONAL}
    assert re.search(r"^test: \$\(TEST_STAMP\)$", makefile, re.M)
    assert re.search(r"^run: \$\(STAMP\)$", makefile, re.M)
    core_install = re.search(r"^\$\(STAMP\):.*?--editable (\S+)", makefile, re.S | re.M)
    assert core_install and core_install.group(1) == ".", "make run installs the package without extras"


def without(module: str, code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where importing `module` fails, as when its extra is not installed."""
    program = f"import sys; sys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind, module, package", [("dask", "prefect_dask", "prefect-dask"), ("ray", "prefect_ray", "prefect-ray")])
def test_a_runner_without_its_extra_names_the_package_and_the_extra(kind, module, package):
    proc = without(
        module,
        f"""
        from tasks.runners import RunnerError, check_runner
        from xfer.config import RunnerConfig
        try:
            check_runner(RunnerConfig(kind={kind!r}))
        except RunnerError as err:
            print(err)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"needs the {package} package" in proc.stdout and f"pip install 'xfer[{kind}]'" in proc.stdout, proc.stdout


def test_a_postgresql_store_without_psycopg2_names_the_team_extra():
    proc = without(
        "psycopg2",
        """
        from tasks.tracking import TrackingURIError, check_tracking_uri
        try:
            check_tracking_uri("postgresql+psycopg2://mlflow:s3cret@db.team:5432/mlflow")
        except TrackingURIError as err:
            print(err)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert "database driver 'psycopg2' is not installed" in message, message
    assert "pip install 'xfer[team]'" in message and "s3cret" not in message, message
