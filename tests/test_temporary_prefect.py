"""servers.temporary_prefect: one temporary Prefect server for a whole command."""

import os
import subprocess
import sys
import urllib.request

CHILD = """
import os, sys, urllib.request
url = os.environ["PREFECT_API_URL"]
with urllib.request.urlopen(url + "/health", timeout=10) as r:
    assert r.status == 200
print(url)
sys.exit(3)
"""


def test_command_gets_a_loopback_server_and_its_exit_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "servers.temporary_prefect", sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 3, proc.stderr
    url = proc.stdout.strip().splitlines()[-1]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    # Stopped with the command.
    try:
        urllib.request.urlopen(url + "/health", timeout=3)
        raise AssertionError("server still answering after the command ended")
    except OSError:
        pass


def test_an_existing_server_is_used_as_is(tmp_path):
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "servers.temporary_prefect", sys.executable, "-c", "import os; print(os.environ['PREFECT_API_URL'])"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "http://127.0.0.1:9/api"
