"""The registered model behind `mlflow models serve`: its signature, and a real scoring request over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY_PARAMS, free_port, listening_addresses

MODEL_URI = f"models:/{TINY_PARAMS['registry']['name']}@champion"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 120


def target_test_images(root: Path) -> pd.DataFrame:
    """The manifest's target test rows: absolute path and class name, as evaluate scored them."""
    manifest = pd.read_csv(root / "data/splits/manifest.csv", dtype={"class_name": str})
    rows = manifest[(manifest.role == "target") & (manifest.split == "test")]
    return pd.DataFrame({"path": [str(root / p) for p in rows.path], "class_name": list(rows.class_name)})


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`mlflow models serve` exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"`mlflow models serve` did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """The server and the workers it started: its whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(pipeline_project, tmp_path_factory):
    """`mlflow models serve` of @champion from the tiny pipeline's store on a free loopback port: its URL."""
    root, _ = pipeline_project
    store = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store}
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_cli, "models", "serve", "-m", MODEL_URI, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        # A session of its own: uvicorn's workers are killed with it, as one group.
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(proc, url, log)
        yield {"url": url, "port": port, "root": root}
    finally:
        stop(proc)


def test_the_registered_model_states_its_signature(pipeline_project):
    import mlflow

    root, _ = pipeline_project
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    signature = mlflow.models.get_model_info(MODEL_URI).signature
    assert signature is not None, "the registered model has no signature"
    inputs = signature.inputs.to_dict()
    assert [c["type"] for c in inputs] == ["string"] and "name" not in inputs[0], inputs
    classes = sorted(set(target_test_images(root).class_name))
    outputs = {c["name"]: c["type"] for c in signature.outputs.to_dict()}
    assert outputs == {
        "class": "string",
        "probability": "float",
        **{name: "float" for name in classes},
        "ood_score": "double",
        "out_of_distribution": "boolean",
    }
    assert {p.name: p.default for p in signature.params.params} == {"batch_size": 64}


def test_served_model_answers_on_loopback_with_the_evaluated_accuracy(served):
    root = served["root"]
    images = target_test_images(root)
    request = {"dataframe_split": {"columns": ["image"], "data": [[p] for p in images.path]}, "params": {"batch_size": 7}}
    status, answer = post(served["url"] + "/invocations", request)
    assert status == 200, answer
    predictions = pd.DataFrame(answer["predictions"])
    assert len(predictions) == len(images)
    evaluated = json.loads((root / "metrics/eval.json").read_text())[TINY_PARAMS["registry"]["model"]]["target_test"]
    # Over HTTP the model scores the target test images exactly as evaluate did.
    assert (predictions["class"].astype(str) == images.class_name).mean() == pytest.approx(evaluated["accuracy"], abs=1e-9)
    classes = sorted(set(images.class_name))
    assert predictions[classes].sum(axis=1).round(4).eq(1.0).all()
    assert listening_addresses(served["port"]) == {"127.0.0.1"}


def test_served_model_answers_a_bad_request_with_400_naming_the_value(served):
    # Numbers where the signature names image paths (MLflow lets an object column
    # through its string check): the model refuses them, naming the value.
    status, answer = post(served["url"] + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [[1.5], [2.5]]}})
    assert status == 400, answer
    assert "expected an image file path or an HxWxC array; got float 1.5" in answer.get("stack_trace", ""), answer
    status, answer = post(served["url"] + "/invocations", {"dataframe_split": {"columns": ["image"], "data": [["/no/such/image.png"]]}})
    assert status == 400 and "cannot read image /no/such/image.png" in answer.get("stack_trace", ""), answer
