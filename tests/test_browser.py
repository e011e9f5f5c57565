"""The MLflow and Prefect UIs, in headless Chromium, over a real pipeline's store.

Debian's /usr/bin/chromium driven by Playwright (never `playwright install`:
it downloads a browser). The servers are the ones `make servers` starts
(servers/supervisor.py) over the store the session's tiny pipeline wrote. Without
Chromium these tests are skipped with that reason, except under CI (CI=true),
where a missing browser fails them.

Screenshots go to $XFER_SCREENSHOTS (default: test-screenshots/ in the repo).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, TINY_PARAMS, free_port, local_and_ci_verdicts, write_params

from servers import supervisor

CHROMIUM = Path(os.environ.get("XFER_CHROMIUM", "/usr/bin/chromium"))
# No GPU, no sandbox (root in a container), and nothing that phones home.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SHOTS = Path(os.environ.get("XFER_SCREENSHOTS", REPO / "test-screenshots"))
TIMEOUT_MS = 60_000  # the MLflow UI's bundle is large; 2 shared cores are slow


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The browser binary: skip without it, but fail under CI, which must run these tests."""
    if CHROMIUM.is_file():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run: {CHROMIUM} is missing, and CI must run them (.ci/run installs it)")
    pytest.skip(f"browser tests skipped: {CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


def open_page(browser, base: str):
    """A fresh page that may load only from `base`: anything else is aborted (no network)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)

    def local_only(route):
        url = route.request.url
        if url.startswith((base + "/", "data:", "blob:")) or url == base:
            route.continue_()
        else:
            route.abort()

    context.route("**/*", local_only)
    return context.new_page()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


@contextlib.contextmanager
def shot_on_failure(page, name: str):
    """Keep what the browser showed when a step failed: FAILED-<name>.png."""
    try:
        yield
    except Exception:
        shot(page, f"FAILED-{name}.png")
        raise


@pytest.fixture(scope="module")
def ui(chromium, pipeline_project, tmp_path_factory):
    """Both servers over the pipeline's store, and one stage flow run in Prefect: the URLs and that run."""
    root, _ = pipeline_project
    home = tmp_path_factory.mktemp("prefect-server-home")
    ports = {"prefect": free_port(), "mlflow": free_port(), "flows": free_port()}
    env = {**os.environ, "PREFECT_HOME": str(home)}
    cmd = [
        sys.executable,
        "-m",
        "servers.supervisor",
        "start",
        "--root",
        str(root),
        "--prefect-port",
        str(ports["prefect"]),
        "--mlflow-port",
        str(ports["mlflow"]),
        "--flows-port",
        str(ports["flows"]),
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    print(f"servers answered in {time.perf_counter() - started:.1f} s")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        prefect = f"http://127.0.0.1:{ports['prefect']}"
        started = time.perf_counter()
        flow_run = run_fetch_against(prefect + "/api", tmp_path_factory.mktemp("fetch"))
        print(f"fetch stage against it in {time.perf_counter() - started:.1f} s")
        yield {"mlflow": f"http://127.0.0.1:{ports['mlflow']}", "prefect": prefect, "flow_run": flow_run}
    finally:
        supervisor.stop(root)


def run_fetch_against(api_url: str, project: Path) -> dict:
    """The fetch stage as dvc runs it, one process, against the server at `api_url`; its flow run there."""
    write_params(project, TINY_PARAMS)
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(project / ".prefect"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.stages", "fetch"]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The fetch stage's run (the served deployments' schedules add runs of their own flows).
    (flow_run,) = api(api_url + "/flow_runs/filter", {"flows": {"name": {"any_": ["fetch"]}}})
    # Task runs reach the server as events, persisted a moment after the process exits: wait for
    # the one fetch ran (the flow run is already Completed) before a page counts them.
    deadline = time.monotonic() + 60
    task_runs = {"flow_runs": {"id": {"any_": [flow_run["id"]]}}}
    while api(api_url + "/task_runs/count", task_runs) < 1:
        assert time.monotonic() < deadline, "the fetch flow run's task run never reached the server"
        time.sleep(0.5)
    return flow_run


def api(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_mlflow_ui_finds_the_experiment_and_a_runs_target_accuracy(browser, ui, pipeline_project):
    root, _ = pipeline_project
    evaluated = json.loads((root / "metrics" / "eval.json").read_text())
    page = open_page(browser, ui["mlflow"])
    with shot_on_failure(page, "mlflow-runs"):
        # The experiment, from the home page's list, in the runs view.
        page.goto(ui["mlflow"] + "/", wait_until="domcontentloaded")
        page.get_by_text("Model training", exact=True).click()
        page.get_by_role("link", name=TINY_PARAMS["mlflow"]["experiment"], exact=True).first.click()
        search = page.get_by_placeholder("metrics.rmse", exact=False)
        search.fill("tags.`xfer.stage` = 'evaluate'")
        search.press("Enter")
        # Stage runs are children of the pipeline run: unfold it to reach evaluate.
        page.get_by_role("row").filter(has_text="pipeline-").get_by_role("button").first.click()
        evaluate = page.get_by_role("link", name="evaluate", exact=True)
        evaluate.wait_for()
        shot(page, "mlflow-1-experiment-runs.png")

        # The evaluate run's target test accuracy, as eval.json has it, for each model.
        evaluate.click()
        page.get_by_placeholder("Search metrics").fill("target_test.accuracy")
        for name in ("head", "finetune", "fusion"):
            metric = f"{name}.target_test.accuracy"
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=metric, exact=True))
            shown = row.get_by_role("cell").nth(1).inner_text()
            assert float(shown) == pytest.approx(evaluated[name]["target_test"]["accuracy"], rel=1e-6), metric
        row.scroll_into_view_if_needed()
        shot(page, "mlflow-2-evaluate-run-target-accuracy.png")


def test_mlflow_ui_shows_the_registered_model_at_champion(browser, ui, pipeline_project):
    from mlflow.tracking import MlflowClient

    root, _ = pipeline_project
    model = TINY_PARAMS["registry"]["name"]
    champion = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_model_version_by_alias(model, "champion")
    page = open_page(browser, ui["mlflow"])
    with shot_on_failure(page, "mlflow-model"):
        # The registry first announces its new UI in a dialog: accept it whenever it shows.
        page.add_locator_handler(
            page.get_by_role("dialog").filter(has_text="Model Registry UI"),
            lambda dialog: dialog.get_by_role("button", name="Try it now").click(),
        )
        page.goto(ui["mlflow"] + "/#/models", wait_until="domcontentloaded")
        page.get_by_role("link", name=model, exact=True).and_(page.locator('[href*="models/"]')).click()
        # "@ champion" is the alias badge; a version tag may also say "champion".
        version_row = page.get_by_role("row").filter(has_text=re.compile(r"@\s*champion"))
        version_row.wait_for()
        assert re.match(rf"Version {champion.version}\b", version_row.inner_text()), version_row.inner_text()
        shot(page, "mlflow-3-model-champion.png")


def test_prefect_ui_lists_the_flow_run(browser, ui):
    run = ui["flow_run"]
    page = open_page(browser, ui["prefect"])
    with shot_on_failure(page, "prefect-runs"):
        page.goto(ui["prefect"] + "/runs", wait_until="domcontentloaded")
        link = page.get_by_role("link", name=run["name"], exact=True)
        link.wait_for()
        # The list names the flow beside the run, its state and its task runs. The row appears
        # before its flow name and task-run count arrive (each its own request): wait for them.
        from playwright.sync_api import expect

        item = page.locator(".state-list-item").filter(has=link)
        for shown in ("fetch", "Completed", "1 Task run"):
            expect(item).to_contain_text(shown, timeout=30_000)
        shot(page, "prefect-flow-runs.png")


def test_missing_chromium_skips_locally_and_fails_under_ci(tmp_path):
    """The message `make test` shows without Chromium, and CI's verdict."""
    test = "tests/test_browser.py::test_prefect_ui_lists_the_flow_run"
    local, ci = local_and_ci_verdicts(test, {"XFER_CHROMIUM": str(tmp_path / "no-chromium")})
    assert local.returncode == 0, local.stdout
    assert f"browser tests skipped: {tmp_path / 'no-chromium'} is missing" in local.stdout
    assert ci.returncode == 1, ci.stdout
    assert "browser tests cannot run" in ci.stdout and "1 error" in ci.stdout
