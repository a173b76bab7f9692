"""`make mlflow-ui` in a real browser: every way into the UI lands in Model-training mode, not MLflow 3's GenAI mode.

A real server started the way `make mlflow-ui` starts it (scripts/mlflow_ui.py, 127.0.0.1) on a small SQLite store (an
experiment with a parent run, a nested run and a registered version), driven in headless Chromium from a fresh
browser profile the way a new user clicks: Home -> Experiments -> the experiment -> the parent run in the runs table;
Models -> the model -> its version; a run page opened directly from an address without ``?workflowType=``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENAI_ONLY = ("Judges", "Sessions", "Evaluation runs")  # the GenAI sidebar's entries (issue 14 item 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(uri: str) -> dict[str, str]:
    from mlflow import MlflowClient

    from cxrtrack.tracking.mlflow_store import EXPERIMENT_TAGS

    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("cxr-ui", tags=EXPERIMENT_TAGS)
    parent = client.create_run(eid, run_name="study-parent").info.run_id
    child = client.create_run(eid, run_name="trial-0", tags={"mlflow.parentRunId": parent}).info.run_id
    for run_id, acc in ((child, 0.8), (parent, 0.9)):
        client.log_metric(run_id, "val/acc", acc, step=1)
        client.set_terminated(run_id)
    client.create_registered_model("CustomCXRNet")
    client.create_model_version("CustomCXRNet", source=f"runs:/{parent}/model", run_id=parent)
    return {"experiment": eid, "parent": parent, "child": child}


def _entry_point_dir(tmp_path: Path) -> list[str]:
    """The `mlflow.app` entry point as `make install` registers it, for a venv installed before it existed."""
    from cxrtrack.tracking.mlflow_ui_app import installed

    if installed():
        return []
    dist = tmp_path / "entry" / "cxrtrack_ui_entry-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cxrtrack-ui-entry\nVersion: 0\n")
    value = next(line.split("=", 1)[1].strip().strip('"') for line in (ROOT / "pyproject.toml").read_text().splitlines()
                 if line.startswith("cxrtrack-ui = "))
    (dist / "entry_points.txt").write_text(f"[mlflow.app]\ncxrtrack-ui = {value}\n")
    return [str(dist.parent)]


@pytest.fixture
def ui_server(tmp_path, empty_mlflow_store):
    uri = empty_mlflow_store(tmp_path / "mlflow.db")
    ids = _store(uri)
    port = _free_port()
    path = [*_entry_point_dir(tmp_path), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "mlflow_ui.py"), "--uri", uri, "--port", str(port)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the MLflow UI did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.5)
        yield base, ids, tmp_path / "server.log"
        # after the tests' seconds of use: no MLflow job runners (six Huey consumers of ~240 MB each, for GenAI jobs)
        import psutil

        runners = [" ".join(c.cmdline()[:4]) for c in psutil.Process(proc.pid).children(recursive=True)
                   if "huey" in " ".join(c.cmdline())]
        assert runners == [], f"make mlflow-ui started MLflow's job runners: {runners}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the launcher exec'd `mlflow ui`, which runs uvicorn in its group
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _sidebar(page) -> str:
    page.wait_for_timeout(1000)  # the UI polls, so no network idle; the sidebar follows the page's own content
    return page.locator("nav").first.inner_text() + "\n" + page.locator("body").inner_text()


def _assert_model_training(page, where: str) -> None:
    text = _sidebar(page)
    shown = [entry for entry in GENAI_ONLY if entry in text]
    assert not shown, f"{where} ({page.url}) is in GenAI mode: its sidebar shows {shown}"


@pytest.mark.slow
def test_every_way_into_the_ui_lands_in_model_training_mode(ui_server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine: `.ci/run` installs Debian's chromium package")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    base, ids, log = ui_server
    assert "opens in Model-training mode" in log.read_text()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()  # a fresh profile
            page.set_default_timeout(30_000)
            # The registry greets a new browser with a "new Model Registry UI" dialog; a user clicks "Try it now".
            page.add_locator_handler(page.get_by_role("dialog").filter(has_text="new Model Registry UI"),
                                     lambda dialog: dialog.get_by_role("button", name="Try it now").click())

            page.goto(base + "/")
            page.get_by_role("link", name="Experiments").first.click()
            page.get_by_role("link", name="cxr-ui").first.click()
            page.wait_for_url("**workflowType=**")  # the experiment page redirects to its mode's first tab
            page.get_by_text("cxrtrack").first.wait_for()  # the experiment's description
            _assert_model_training(page, "the experiment opened from the experiments list")
            assert "/runs?" in page.url
            page.get_by_role("link", name="study-parent").first.wait_for()
            page.get_by_role("link", name="study-parent").first.click()  # the runs table's run name
            page.wait_for_url(f"**/runs/{ids['parent']}**")
            page.get_by_text("Model metrics").first.wait_for()
            _assert_model_training(page, "the parent run opened from the runs table")

            page.goto(base + "/")
            page.get_by_role("link", name="Model registry").first.click()
            page.get_by_role("link", name="CustomCXRNet").first.click()
            page.get_by_role("link", name="Version 1").first.click()
            page.wait_for_url("**/models/CustomCXRNet/versions/1**")
            page.get_by_text("Registered At").first.wait_for()
            _assert_model_training(page, "the registered version opened from the registry")

            direct = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            direct.goto(f"{base}/#/experiments/{ids['experiment']}/runs/{ids['child']}")  # no ?workflowType=
            direct.get_by_text("trial-0").first.wait_for()
            _assert_model_training(direct, "a run page opened directly")

            # The seed is a default only: a user who picks GenAI with the switch keeps it on the next visit.
            direct.get_by_text("GenAI", exact=True).first.click()
            direct.goto(f"{base}/#/experiments/{ids['experiment']}/runs/{ids['child']}")
            direct.reload()
            assert "Judges" in _sidebar(direct)
        finally:
            browser.close()


def test_the_ui_page_gets_the_seed_and_everything_else_passes_untouched():
    import asyncio

    from cxrtrack.tracking.mlflow_ui_app import SEED_SCRIPT, ModelTrainingByDefault, seed_model_training

    page = b'<!doctype html><html lang="en"><head><meta charset="utf-8"/></head><body></body></html>'
    seen: list[dict] = []

    async def mlflow_app(scope, receive, send):  # stands in for MLflow's app: the page in two chunks, with an etag
        seen.append(scope)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"etag", b'"x"'),
                                (b"content-length", str(len(page)).encode())]})
        await send({"type": "http.response.body", "body": page[:20], "more_body": True})
        await send({"type": "http.response.body", "body": page[20:]})

    def get(method: str, path: str) -> list[dict]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": [(b"if-none-match", b'"x"')]}
        asyncio.run(ModelTrainingByDefault(mlflow_app)(scope, None, send))
        return sent

    start, body = get("GET", "/")
    assert body["body"] == seed_model_training(page)
    assert body["body"].index(SEED_SCRIPT.encode()) == len(b'<!doctype html><html lang="en"><head>')
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(len(body["body"])).encode() and b"etag" not in headers
    assert seen[-1]["headers"] == []  # no 304 for a copy cached without the script
    assert b"".join(m.get("body", b"") for m in get("GET", "/ajax-api/2.0/mlflow/runs/search")) == page
    assert b"".join(m.get("body", b"") for m in get("POST", "/")) == page
    assert seed_model_training(b"no head here") == b"no head here"
