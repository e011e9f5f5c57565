"""Secrets never leave the process (issue 17, Secrets and Part 2).

A password in XFER_TRACKING_URI goes to MLflow as basic auth, never into a
printed line, a report or Prefect; a token in a dataset URL is refused in
params.yaml (it would reach dvc.lock, MLflow and dataset.json) and is given
instead by ~/.netrc ($NETRC) and XFER_DOWNLOAD_QUERY, used for the request
only. The end-to-end test runs the whole `dvc repro` under a temporary Prefect
server against a real `mlflow server` and a dataset server on 127.0.0.1, both
behind a gate that refuses requests without the credentials, then greps every
output for the secrets.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from datasets import image_folder, zip_folder
from helpers import TINY_PARAMS, free_port
from http_server import serve_directory
from test_dvc import make_repo, sh
from test_team_servers import Background

from xfer.config import ConfigError, parse_params
from xfer.data.download import DownloadError, download
from xfer.io import sha256_file
from xfer.redact import redact, redact_url, split_userinfo, url_secrets

TRACKING_PASSWORD = "pw-Zq81mlflowSecret"
DATASET_TOKEN = "tok-Xy93datasetSecret"
DATASET_SIGNATURE = "sig-Lm55amzSecret"
NETRC_PASSWORD = "np-Kk27netrcSecret"
SECRETS = (TRACKING_PASSWORD, DATASET_TOKEN, DATASET_SIGNATURE, NETRC_PASSWORD)


# -- the redaction helper ---------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown, secrets",
    [
        ("http://user:pw@127.0.0.1:5000", "http://user:***@127.0.0.1:5000", ["pw"]),
        ("https://ghp_TOKEN@host/a.zip", "https://***@host/a.zip", ["ghp_TOKEN"]),
        ("https://h/a.zip?token=T1&v=2", "https://h/a.zip?token=***&v=2", ["T1"]),
        ("https://h/a.zip?access_token=T2", "https://h/a.zip?access_token=***", ["T2"]),
        (
            "https://b.s3.amazonaws.com/a.zip?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Date=2020&X-Amz-Signature=abc",
            "https://b.s3.amazonaws.com/a.zip?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Date=2020&X-Amz-Signature=***",
            ["AKIA%2F1", "abc"],
        ),
        ("https://acct.blob.core.windows.net/c/a.zip?sv=2022&sig=S%2B3", "https://acct.blob.core.windows.net/c/a.zip?sv=2022&sig=***", ["S%2B3"]),
        ("https://h/a.zip?X-Goog-Signature=G&hf_token=H", "https://h/a.zip?X-Goog-Signature=***&hf_token=***", ["G", "H"]),
        ("postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow", ["s3cret"]),
        ("https://user@host/a.zip", "https://***@host/a.zip", ["user"]),
        ("https://host:8443/a.zip?v=1&flag", "https://host:8443/a.zip?v=1&flag", []),
        ("./local/a.zip", "./local/a.zip", []),
        ("digits", "digits", []),
    ],
)
def test_redact_url_masks_passwords_tokens_and_signatures_and_keeps_the_rest(url, shown, secrets):
    assert redact_url(url) == shown
    assert url_secrets(url) == secrets
    assert url_secrets(redact_url(url)) in ([], ["***"] * len(secrets))


def test_redact_finds_every_url_inside_a_message():
    text = "API request to http://u:PW1@127.0.0.1:5000/api failed; retry 'https://h/x.zip?sig=SIG2' or (https://T3@h/y)."
    out = redact(text)
    assert "PW1" not in out and "SIG2" not in out and "T3" not in out
    assert out == "API request to http://u:***@127.0.0.1:5000/api failed; retry 'https://h/x.zip?sig=***' or (https://***@h/y)."
    assert redact("no url here: token=abc") == "no url here: token=abc"
    # A URL cut short (YAML quotes only part of a line): its secret query values are masked all the same.
    assert redact("  ... .zip?v=1&access_token=T4: [") == "  ... .zip?v=1&access_token=*** ["


def test_split_userinfo_decodes_and_removes_the_credentials():
    assert split_userinfo("http://us%40er:p%3Aw@127.0.0.1:5000/x?y=1") == ("http://127.0.0.1:5000/x?y=1", "us@er", "p:w")
    assert split_userinfo("https://TOKEN@host") == ("https://host", "TOKEN", None)
    assert split_userinfo("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None, None)


# -- params.yaml refuses a dataset URL with secrets -------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{DATASET_TOKEN}@data.example/shop.zip",
        f"https://{DATASET_TOKEN}@data.example/shop.zip",
        f"https://data.example/shop.zip?token={DATASET_TOKEN}",
        f"https://b.s3.amazonaws.com/shop.zip?X-Amz-Date=2020&X-Amz-Signature={DATASET_TOKEN}",
        f"https://data.example/shop.zip?access_token={DATASET_TOKEN}",
    ],
)
def test_a_dataset_url_with_credentials_is_refused_saying_how_to_give_them(url):
    with pytest.raises(ConfigError) as err:
        parse_params({"data": {"dataset": url, "sha256": "0" * 64, "name": "shop", "source_domain": "a", "target_domain": "b"}})
    message = str(err.value)
    assert "data.dataset" in message and redact_url(url) in message
    assert "~/.netrc" in message and "XFER_DOWNLOAD_QUERY" in message
    assert DATASET_TOKEN not in message


def test_a_yaml_error_on_the_dataset_line_does_not_print_the_token(tmp_path):
    from xfer.config import load_params

    (tmp_path / "params.yaml").write_text(f"data:\n  dataset: https://h/x.zip?token={DATASET_TOKEN}: [\n")
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert "not valid YAML" in str(err.value) and DATASET_TOKEN not in str(err.value)


def test_the_tracking_uri_password_goes_to_mlflows_variables_not_the_uri_or_the_report(monkeypatch):
    from tasks import report, tracking

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "XFER_MLFLOW_UI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XFER_TRACKING_URI", f"http://alice:{TRACKING_PASSWORD}@mlflow.team:5000")
    assert tracking.team_tracking_uri() == "http://mlflow.team:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == TRACKING_PASSWORD
    page = report.markdown_report({}, None, "1", "abc", "def")
    assert "http://mlflow.team:5000/#/experiments/1/runs/abc" in page and TRACKING_PASSWORD not in page
    monkeypatch.setenv("XFER_TRACKING_URI", f"https://{TRACKING_PASSWORD}@mlflow.team")
    assert tracking.team_tracking_uri() == "https://mlflow.team"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == TRACKING_PASSWORD


def test_the_report_links_to_xfer_mlflow_ui_without_its_login_or_a_token(monkeypatch):
    """Before: XFER_MLFLOW_UI went into report.md and the Prefect artifact as given, login and all."""
    from tasks import report

    monkeypatch.setenv("XFER_MLFLOW_UI", f"https://carol:{TRACKING_PASSWORD}@mlflow.team/ui/?token={DATASET_TOKEN}")
    page = report.markdown_report({}, None, "1", "abc", "def")
    assert "https://mlflow.team/ui/?token=***/#/experiments/1/runs/abc" in page
    assert TRACKING_PASSWORD not in page and DATASET_TOKEN not in page and "carol" not in page


# -- the download path: credentials from ~/.netrc and the query, never in a message --


class Gate:
    """An HTTP server on 127.0.0.1 that answers 401 unless a request carries the basic auth
    `user:password` and every `query` item; then it forwards to `upstream` (a URL) or serves
    files from `folder`. `seen` records (path, allowed) per request."""

    def __init__(self, user: str, password: str, query: dict[str, str] | None = None, upstream: str | None = None, folder: Path | None = None):
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.query, self.upstream, self.folder = query or {}, upstream, folder
        self.seen: list[tuple[str, bool]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                parts = urlsplit(self.path)
                got = {k: v[0] for k, v in parse_qs(parts.query).items()}
                allowed = self.headers.get("Authorization") == gate.expected and all(got.get(k) == v for k, v in gate.query.items())
                gate.seen.append((parts.path, allowed))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not allowed:
                    return self._send(401, b"", {"WWW-Authenticate": 'Basic realm="test"'})
                if gate.folder is not None:
                    file = gate.folder / parts.path.lstrip("/")
                    return self._send(200, file.read_bytes(), {}) if file.is_file() else self._send(404, b"", {})
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization", "content-length", "connection")}
                request = urllib.request.Request(
                    gate.upstream + self.path, data=body if self.command in ("POST", "PUT", "PATCH") else None, headers=headers, method=self.command
                )
                try:
                    with urllib.request.urlopen(request, timeout=60) as resp:
                        status, data, rheaders = resp.status, resp.read(), resp.headers
                except urllib.error.HTTPError as e:
                    status, data, rheaders = e.code, e.read(), e.headers
                self._send(status, data, {"Content-Type": rheaders.get("Content-Type", "application/json")})

            def _send(self, status, data, headers):
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        return Handler


def write_netrc(path: Path, host: str, login: str, password: str) -> Path:
    path.write_text(f"machine {host}\n  login {login}\n  password {password}\n")
    path.chmod(0o600)
    return path


def test_download_sends_netrc_auth_and_the_secret_query_and_names_neither(tmp_path, monkeypatch):
    (tmp_path / "www").mkdir()
    (tmp_path / "www/a.bin").write_bytes(b"x" * 1000)
    monkeypatch.setenv("NETRC", str(write_netrc(tmp_path / "netrc", "127.0.0.1", "bob", NETRC_PASSWORD)))
    with Gate("bob", NETRC_PASSWORD, {"token": DATASET_TOKEN}, folder=tmp_path / "www") as gate:
        out = download(f"{gate.url}/a.bin", tmp_path / "dl/a.bin", sha256_file(tmp_path / "www/a.bin"), progress=False, query=f"token={DATASET_TOKEN}")
        assert out.read_bytes() == b"x" * 1000 and gate.seen == [("/a.bin", True)]
        # A wrong token: refused by the server; the message says where to give credentials and shows none.
        with pytest.raises(DownloadError) as err:
            download(f"{gate.url}/a.bin?v=1", tmp_path / "dl/b.bin", None, progress=False, attempts=1, query=f"token=wrong-{DATASET_TOKEN}")
        assert "401" in str(err.value) and "~/.netrc" in str(err.value) and DATASET_TOKEN not in str(err.value)
        # An unreachable host: a retried failure whose message shows no secret either.
        with pytest.raises(DownloadError) as err:
            download(f"http://127.0.0.1:{free_port()}/a.bin", tmp_path / "dl/c.bin", None, progress=False, attempts=1, query=f"sig={DATASET_TOKEN}")
        assert DATASET_TOKEN not in str(err.value)


def test_netrc_auth_is_not_sent_on_to_a_redirects_host(tmp_path, monkeypatch):
    (tmp_path / "www").mkdir()
    (tmp_path / "www/a.bin").write_bytes(b"y" * 100)
    with serve_directory(tmp_path / "www") as other, serve_directory(tmp_path / "www") as first:
        first.redirect("a.bin", other.url("a.bin"))
        monkeypatch.setenv("NETRC", str(write_netrc(tmp_path / "netrc", "127.0.0.1", "bob", NETRC_PASSWORD)))
        seen = []
        original = BaseHTTPRequestHandler.parse_request

        def spy(self):
            ok = original(self)
            seen.append((self.server.server_address[1], self.headers.get("Authorization")))
            return ok

        monkeypatch.setattr(BaseHTTPRequestHandler, "parse_request", spy)
        download(first.url("a.bin"), tmp_path / "dl/a.bin", None, progress=False)
    assert (tmp_path / "dl/a.bin").read_bytes() == b"y" * 100
    by_port = dict(seen)
    assert by_port[first.port] is not None, "the first host gets the netrc credentials"
    assert by_port[other.port] is None, "the redirect's host does not"


# -- end to end: dvc repro fetch with a password in XFER_TRACKING_URI and a token for the dataset


def files_containing(folder: Path, secrets) -> dict[str, list[str]]:
    """{file: [secrets it holds]} for every regular file under `folder`, read as bytes."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits = [s for s in secrets if s.encode() in data]
            if hits:
                found[str(path)] = hits
    return found


@pytest.fixture(scope="module")
def mlflow_behind_a_gate(tmp_path_factory):
    """A real `mlflow server` (sqlite store, proxied artifacts) on 127.0.0.1, reachable only through a
    Gate that wants basic auth alice:TRACKING_PASSWORD: (gate, the server's folder)."""
    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for leak in ("MLFLOW_TRACKING_URI", "XFER_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(leak, None)
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", str(base / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = Background("mlflow", command, env, base / "mlflow.log")
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", time.monotonic() + 180)
        with Gate("alice", TRACKING_PASSWORD, upstream=f"http://127.0.0.1:{port}") as gate:
            yield gate, base
    finally:
        server.stop()


def test_secrets_reach_no_output_of_a_whole_dvc_repro(tmp_path, mlflow_behind_a_gate):
    """Every stage, fetch to evaluate's registration and report, with a password in XFER_TRACKING_URI,
    a login in XFER_MLFLOW_UI (the report's links), a netrc password and secret query values for
    the dataset: none of them in stdout, stderr, the project, the MLflow server's files or Prefect's."""
    gate, server_dir = mlflow_behind_a_gate
    image_folder(tmp_path / "src", {"a": 10, "b": 8}, wrapper="shop")
    (tmp_path / "www").mkdir()
    zip_folder(tmp_path / "src", tmp_path / "www/shop.zip")
    project = tmp_path / "project"
    project.mkdir()
    home = tmp_path / "prefect-home"
    # The dataset host is named `localhost`, MLflow's 127.0.0.1: requests (under MLflow) would send a
    # netrc entry for MLflow's own host in place of MLFLOW_TRACKING_USERNAME / _PASSWORD.
    netrc = write_netrc(tmp_path / "netrc", "localhost", "bob", NETRC_PASSWORD)
    with Gate("bob", NETRC_PASSWORD, {"token": DATASET_TOKEN, "X-Amz-Signature": DATASET_SIGNATURE}, folder=tmp_path / "www") as data_gate:
        # Harmless query values may stay in params.yaml.
        url = f"{data_gate.url.replace('127.0.0.1', 'localhost')}/shop.zip?X-Amz-Date=20260101"
        data = {"dataset": url, "sha256": sha256_file(tmp_path / "www/shop.zip"), "name": "shop", "source_domain": "a", "target_domain": "b"}
        params = {**TINY_PARAMS, "data": {**TINY_PARAMS["data"], **data, "split": {**TINY_PARAMS["data"]["split"], "target_shots": 1}}}
        env, dvc = make_repo(project, params, prefect_api="")
        env.pop("PREFECT_API_URL")
        env.update(
            PREFECT_HOME=str(home),
            NETRC=str(netrc),
            XFER_TRACKING_URI=f"{gate.url.replace('http://', f'http://alice:{TRACKING_PASSWORD}@')}",
            XFER_MLFLOW_UI=f"http://carol:{TRACKING_PASSWORD}@mlflow.team:5000",
            XFER_DOWNLOAD_QUERY=f"token={DATASET_TOKEN}&X-Amz-Signature={DATASET_SIGNATURE}",
        )
        for leak in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(leak, None)
        run = sh([sys.executable, "-m", "servers.temporary_prefect", dvc, "repro"], project, env)
        assert data_gate.seen == [("/shop.zip", True)], "the dataset came with the netrc login and the secret query"
    for stage in ("fetch", "split", "features", "head", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout
    assert (project / "data/raw/shop/images.csv").is_file() and (project / "metrics/eval.json").is_file()
    assert gate.seen and all(allowed for _, allowed in gate.seen), "every MLflow request carried the credentials"
    from mlflow.tracking import MlflowClient

    upstream = gate.upstream
    runs = MlflowClient(tracking_uri=upstream).search_runs([e.experiment_id for e in MlflowClient(tracking_uri=upstream).search_experiments()])
    fetch_run = next(r for r in runs if r.data.tags.get("xfer.stage") == "fetch")
    assert fetch_run.data.params["data.dataset"] == url and fetch_run.info.status == "FINISHED"
    assert {r.data.tags.get("xfer.stage") for r in runs if r.info.status == "FINISHED"} >= {"fetch", "split", "features", "head", "finetune", "evaluate"}
    # The report went to the server's artifacts, its links to the UI without the login.
    [report] = [p for p in server_dir.rglob("report.md")]
    assert "http://mlflow.team:5000/#/experiments/" in report.read_text()
    # MLflow printed its "View run" line: with the URI, not the password.
    assert f"View run fetch at: {gate.url}" in run.stdout + run.stderr
    for output in (run.stdout, run.stderr):
        assert not [s for s in SECRETS if s in output]
    assert (home / "prefect.db").is_file() or list(home.rglob("*.db")), "Prefect kept its database in PREFECT_HOME"
    for folder in (project, server_dir, home):
        assert files_containing(folder, SECRETS) == {}, f"secrets written under {folder}"


def test_the_same_fetch_with_the_token_in_params_yaml_stops_before_any_work(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    params = {
        **TINY_PARAMS,
        "data": {**TINY_PARAMS["data"], "dataset": f"https://h.example/shop.zip?token={DATASET_TOKEN}", "sha256": "0" * 64, "name": "shop"},
    }
    from helpers import write_params

    write_params(project, params)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "flows.stages", "fetch", "--root", str(project)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "XFER_DOWNLOAD_QUERY" in proc.stderr and DATASET_TOKEN not in proc.stdout + proc.stderr
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]


def test_xfer_predict_with_a_password_in_tracking_uri_prints_no_password(tmp_path, mlflow_behind_a_gate):
    """`xfer predict --tracking-uri http://user:pw@...` sends the credentials and never prints them,
    even in the error for a model the store does not hold."""
    gate, _ = mlflow_behind_a_gate
    (tmp_path / "img.png").write_bytes(b"")
    uri = gate.url.replace("http://", f"http://alice:{TRACKING_PASSWORD}@")
    seen_before = len(gate.seen)
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    for leak in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "XFER_TRACKING_URI"):
        env.pop(leak, None)
    command = [sys.executable, "-m", "cli", "predict", str(tmp_path / "img.png"), "--model", "models:/absent@champion", "--tracking-uri", uri]
    proc = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot load model models:/absent@champion" in proc.stderr, proc.stderr[-2000:]
    assert TRACKING_PASSWORD not in proc.stdout + proc.stderr
    assert gate.seen[seen_before:] and all(allowed for _, allowed in gate.seen[seen_before:]), "the registry was asked with the credentials"
    # A store that does not answer: MLflow's error names the URL it tried, which must not hold the password.
    command[-1] = f"http://alice:{TRACKING_PASSWORD}@127.0.0.1:{free_port()}"
    proc = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and ("http://alice:***@127.0.0.1" in proc.stderr or "http://127.0.0.1" in proc.stderr), proc.stderr[-2000:]
    assert TRACKING_PASSWORD not in proc.stdout + proc.stderr
