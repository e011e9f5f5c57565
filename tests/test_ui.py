"""`make ui` serves the project's MLflow store on 127.0.0.1."""

import json
import os
import signal
import subprocess
import time
import urllib.request

from helpers import REPO, free_port, listening_addresses


def get(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


def test_make_ui_serves_the_stage_runs(pipeline_project):
    root, result = pipeline_project
    port = free_port()
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "ui", f"STORE={root}", f"UI_PORT={port}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, page = get(base + "/")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not start:\n{proc.stdout.read().decode()[-3000:]}")
                time.sleep(1)
        assert status == 200 and b"<html" in page.lower()
        _, body = get(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=xfer")
        exp_id = json.loads(body)["experiment"]["experiment_id"]
        _, body = get(base + "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "filter": "tags.`xfer.kind` = 'stage'"})
        stages = {t["value"] for r in json.loads(body)["runs"] for t in r["data"]["tags"] if t["key"] == "xfer.stage"}
        assert stages == {"fetch", "split", "features", "head", "finetune", "evaluate"}
        # Bound to loopback only.
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
