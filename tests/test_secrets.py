"""No credential leaves the process: secrets planted in a tracking URI (config and MLFLOW_TRACKING_URI), in --set
tags and in WANDB_API_KEY / *_TOKEN / *_SECRET* variables; a run tracked in both MLflow (a real server) and W&B;
then every record of both stores, every file they and the run wrote, and the captured terminal output are
searched for each secret: zero hits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from cxrtrack.benchmark.server import free_port
from tests.conftest import CONFIGS, ROOT, wandb_leet

pytestmark = pytest.mark.slow

URI_PASSWORD = "uRiPa55w0rd-7f3k2q"
ENV_URI_PASSWORD = "eNvPa55w0rd-9q8w1z"
TAG_SECRET = "tAgS3cretV4lue-4r5t"
WANDB_KEY = "wandbkey" + "0123456789abcdef" * 2
HF_TOKEN = "hFt0kenValue-abcdef123456"
OTHER_SECRET = "mYs3cretValue-zyxw9876"
SECRETS = [URI_PASSWORD, ENV_URI_PASSWORD, TAG_SECRET, WANDB_KEY, HF_TOKEN, OTHER_SECRET]


def hits_in_files(root: Path) -> list[tuple[str, str]]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [(str(path), s) for s in SECRETS if s.encode() in data]
    return hits


@pytest.fixture(scope="module")
def server(tmp_path_factory, migrated_server):
    srv = migrated_server(tmp_path_factory.mktemp("secrets") / "server").start()
    yield srv
    srv.kill()


@pytest.mark.parametrize("uri_from", ["config", "MLFLOW_TRACKING_URI"])
def test_planted_credentials_reach_no_store_file_or_terminal(tmp_path, tiny_data_root, uri_from, server):
    host = f"127.0.0.1:{server.port}"
    env = {**os.environ, "WANDB_API_KEY": WANDB_KEY, "HF_TOKEN": HF_TOKEN, "MY_SECRET_VALUE": OTHER_SECRET,
           # the W&B cloud, and only it, is replaced: by an address where nothing answers (no network here anyway)
           "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    args = []
    if uri_from == "config":
        args += ["--set", f"tracking.mlflow.tracking_uri=http://alice:{URI_PASSWORD}@{host}"]
        env["MLFLOW_TRACKING_URI"] = f"http://bob:{ENV_URI_PASSWORD}@{host}"  # set, but the config wins
    else:
        env["MLFLOW_TRACKING_URI"] = f"http://bob:{ENV_URI_PASSWORD}@{host}"
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIGS / "quick.yaml"),
               "--data", str(tiny_data_root), "--tracker", "both", "--epochs", "1",
               "--set", f"output_dir={tmp_path / 'outputs'}", "--set", f"tracking.wandb.dir={tmp_path}",
               "--set", "tracking.wandb.init_timeout=5", "--set", "tracking.mlflow.system_metrics_interval=1",
               "--set", f"tracking.tags.deploy_token={TAG_SECRET}",
               "--set", f"tracking.tags.note=pulled with {HF_TOKEN} and {OTHER_SECRET}", *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    assert "logging this run offline instead" in terminal  # the key made W&B try its (unreachable) cloud first

    # MLflow: every record through the client (params, tags, metric names, run name, artifacts' content)...
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run_name = next((tmp_path / "outputs").iterdir()).name
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"attributes.run_name = '{run_name}'")
    records = [run.info.run_name, *run.data.params.keys(), *run.data.params.values(), *run.data.tags.keys(),
               *run.data.tags.values(), *run.data.metrics.keys()]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    assert any(local.rglob("config.yaml"))
    # ...and the server's files themselves (its database and artifact store)
    # W&B: every record of the offline run, and every file W&B wrote (run folder, staging and cache folders)
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    records += [wandb_leet(wandb_run), wandb_leet(wandb_run, "--summary")]
    assert (wandb_run / "files" / "output.log").is_file()  # console capture was on and is clean

    hits = [("terminal", s) for s in SECRETS if s in terminal]
    hits += [("store record", s) for s in SECRETS for r in records if s in str(r)]
    for root in (server.folder, local, tmp_path / "wandb", tmp_path / "outputs",
                 Path(os.environ["WANDB_DATA_DIR"]), Path(os.environ["WANDB_CACHE_DIR"])):
        hits += hits_in_files(root)
    assert hits == [], hits
    # the redaction left its marks where the values were
    assert run.data.tags["deploy_token"] == "***REDACTED***"
    if uri_from == "config":
        assert "***" in run.data.params["tracking.mlflow.tracking_uri"]
    print(f"\n[figures] secrets test ({uri_from}): {len(SECRETS)} secrets planted, {len(hits)} hits")
