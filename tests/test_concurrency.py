"""Four training processes started at once, on a fresh SQLite store and against one tracking server: all four
finish with all their metrics, in four distinct run folders and run names."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from tests.conftest import CONFIGS, ROOT

pytestmark = pytest.mark.slow

N_PROCESSES, EPOCHS = 4, 2


def start_four(tmp_path, data, tracking_uri: str, artifacts: list[str]) -> list[subprocess.Popen]:
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIGS / "quick.yaml"),
               "--data", str(data), "--tracker", "mlflow", "--epochs", str(EPOCHS),
               "--set", f"output_dir={tmp_path / 'outputs'}", "--set", f"tracking.mlflow.tracking_uri={tracking_uri}",
               "--set", "tracking.mlflow.system_metrics=false", "--set", "evaluation.run_test=false", *artifacts]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # four processes share 2 cores
    return [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"p{i}.log", "w"),  # noqa: SIM115
                             env=env) for i in range(N_PROCESSES)]


def assert_all_finished(tmp_path, procs, tracking_uri: str) -> None:
    codes = [p.wait(600) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(N_PROCESSES)]
    assert codes == [0] * N_PROCESSES, [log[-2000:] for log, c in zip(logs, codes, strict=True) if c]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == N_PROCESSES
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        for key in ("train/loss", "val/loss", "val/acc", "lr"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, EPOCHS + 1))
    assert len({r.info.run_name for r in runs}) == N_PROCESSES  # never a shared run name...
    folders = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    assert len(folders) == N_PROCESSES and {p.name for p in folders} == {r.info.run_name for r in runs}  # ...or folder
    print(f"\n[figures] {N_PROCESSES} concurrent runs on a fresh store ({tracking_uri.split(':')[0]}): "
          f"{sum(c == 0 for c in codes)} finished with all {EPOCHS} epochs of metrics")


def test_four_processes_on_a_fresh_sqlite_store(tmp_path, tiny_data_root):
    db = tmp_path / "fresh" / "mlflow.db"
    assert not db.exists()
    uri = f"sqlite:///{db}"
    procs = start_four(tmp_path, tiny_data_root, uri,
                       ["--set", f"tracking.mlflow.artifact_location={tmp_path / 'art'}"])
    assert_all_finished(tmp_path, procs, uri)


def test_four_processes_against_one_server(tmp_path, tiny_data_root, migrated_server):
    # the server's own store starts migrated (migrated_server): the race on a new store is the test above's
    server = migrated_server(tmp_path / "server").start()
    try:
        procs = start_four(tmp_path, tiny_data_root, server.uri, [])
        assert_all_finished(tmp_path, procs, server.uri)
    finally:
        server.kill()
