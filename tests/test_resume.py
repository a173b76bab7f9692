"""Resume: a run stopped after epoch k continues from checkpoints/last.pt into the same MLflow run and the same W&B
run id, with every epoch logged once, and trains exactly as the uninterrupted run would have (RNG states restored).
Read back from the SQLite store and the offline W&B folders; one real SIGTERM through scripts/train.py, and its
resume through the same script run in this process (runpy: the same code path without a second interpreter start)."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cxrtrack.config import set_dotted
from cxrtrack.errors import CXRError
from cxrtrack.tracking.readback import RunRecord, diff_records, read_mlflow
from tests.conftest import ROOT, run_script, wandb_leet

pytestmark = pytest.mark.slow


def configured(tiny_cfg, tmp_path, name, **values):
    cfg = copy.deepcopy(tiny_cfg)
    for key, value in {"training.epochs": 4, "output_dir": str(tmp_path / name), **values}.items():
        set_dotted(cfg, key.split("."), value)
    return cfg


def wandb_epochs(run_dir) -> list[int]:
    rows = [json.loads(line) for line in wandb_leet(run_dir).splitlines() if line.strip()]
    return [int(r["history"]["item"]["epoch"]) for r in rows
            if r["type"] == "history" and "val/loss" in r["history"]["item"]]


def test_interrupted_run_resumes_into_the_same_tracked_runs(tmp_path, tiny_cfg, migrated_mlflow_db):
    import mlflow

    from cxrtrack.training import resume as resuming
    from cxrtrack.training.run import run_experiment

    # the reference: four epochs without a stop
    straight = run_experiment(configured(tiny_cfg, tmp_path, "straight", **{"tracking.tracker": "none"}))
    sent = RunRecord.from_json((straight.run_dir / "tracked.json").read_text())  # written with no tracker too
    assert sent.extra["runs"] == {} and [s for s, _ in sent.metrics["val/loss"]] == [1, 2, 3, 4]

    def stop_after_two(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C after epoch 2 (the epoch's row, checkpoint and tracker calls are done)

    cfg = configured(tiny_cfg, tmp_path, "outputs", **{"tracking.tracker": "both"})
    first = run_experiment(copy.deepcopy(cfg), callbacks=(stop_after_two,))
    assert first.status == "KILLED" and len(first.fit.history) == 2
    refs = json.loads((first.run_dir / "runs.json").read_text())["runs"]
    mlflow_id, wandb_id = refs["mlflow"]["run_id"], refs["wandb"]["run_id"]

    # resumed by its W&B run id (found through outputs/<run>/runs.json)
    point = resuming.load(wandb_id, cfg["output_dir"])
    assert point.run_dir == first.run_dir and point.epoch == 2
    second = run_experiment(resuming.resume_config(point), resume=point)
    assert second.status == "FINISHED" and second.run_dir == first.run_dir
    assert [r["epoch"] for r in second.fit.history] == [1, 2, 3, 4]
    # continued exactly: the same numbers as the run that was never stopped
    for got, want in zip(second.fit.history, straight.fit.history, strict=True):
        for key in ("train/loss", "val/loss", "val/acc", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["epoch"], key)

    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["mlflow"]["tracking_uri"])
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED" and second.tracker.trackers[0].run_id == mlflow_id
    history = client.get_metric_history(mlflow_id, "val/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # no epoch twice
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r["val/loss"] for r in second.fit.history])
    assert run.data.metrics["test/acc"] == pytest.approx(second.test.metrics["acc"])
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no second run was created
    # tracked.json holds the whole run, the epochs of the first part included, as the store does
    sent = RunRecord.from_json((second.run_dir / "tracked.json").read_text())
    assert [s for s, _ in sent.metrics["val/loss"]] == [1, 2, 3, 4]
    assert sent.extra["runs"]["mlflow"]["run_id"] == mlflow_id
    stored = read_mlflow(cfg["tracking"]["mlflow"]["tracking_uri"], mlflow_id)
    points = diff_records(sent, stored, "mlflow")["metric_points"]
    assert not points.lost and points.found == sum(len(v) for v in sent.metrics.values())

    # W&B (offline): the second part is a new folder with the same run id; together they hold epochs 1-4 once
    first_dir, second_dir = first.tracker.trackers[1].run_dir, second.tracker.trackers[1].run_dir
    # W&B names a run's folder offline-run-<start second>-<id>; a resume that starts in the same second as the first
    # run (a fast machine) gets "-1" appended to the same name
    assert first_dir != second_dir and re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{wandb_id}(-\d+)?", second_dir.name)
    assert first_dir.name.endswith(wandb_id)
    assert wandb_epochs(first_dir) == [1, 2] and wandb_epochs(second_dir) == [3, 4]


def test_resume_errors_are_one_paragraph(tmp_path, tiny_cfg):
    from cxrtrack.training import resume as resuming

    with pytest.raises(CXRError, match="Cannot find the run 'nope'"):
        resuming.load("nope", tmp_path)
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CXRError, match="has no checkpoints/last.pt"):
        resuming.load(str(tmp_path / "r"), tmp_path)
    # the default `make mlflow-train` is a cross-validation: its folder is a parent, not a run to continue
    for sub, kind in (("folds", "cross-validation"), ("seeds", "seed study")):
        (tmp_path / f"cv-{sub}" / sub / "x-1" / "checkpoints").mkdir(parents=True)
        with pytest.raises(CXRError, match=f"is a {kind}.*Start the {kind} again"):
            resuming.load(str(tmp_path / f"cv-{sub}"), tmp_path)


def test_sigterm_then_resume_by_mlflow_run_id(tmp_path, tiny_cfg, migrated_mlflow_db, caplog):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", str(ROOT / "configs" / "quick.yaml"), "--data", tiny_cfg["data"]["path"],
              "--set", f"output_dir={tmp_path / 'outputs'}", "--set", f"tracking.mlflow.tracking_uri={uri}",
              "--set", f"tracking.mlflow.artifact_location={tmp_path / 'mlartifacts'}", "--set", "data.image_size=64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *common, "--tracker", "mlflow",
                             "--epochs", "30"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # not a terminal: one line per epoch, no progress bar
        lines.append(line)
        if "epoch 2/30" in line or time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, "".join(lines) + rest
    assert "batch/s" not in "".join(lines) + rest  # no tqdm bar in a log
    client = mlflow.MlflowClient(tracking_uri=uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("cxr-quick").experiment_id])
    assert killed.info.status == "KILLED"
    done = sorted(m.step for m in client.get_metric_history(killed.info.run_id, "val/loss"))
    assert done[:2] == [1, 2] and done == list(range(1, len(done) + 1))

    # a new process in effect: nothing of the killed run is in this one, the resume finds it through the store.
    # --threads 1: what this test process already uses (conftest), so the script does not change it for later tests
    with caplog.at_level(logging.INFO):
        proc = run_script("train.py", *common, "--resume", killed.info.run_id, "--epochs", str(len(done) + 2),
                          "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stderr + caplog.text)[-3000:]
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(killed.info.run_id, "val/loss"))
    assert steps == list(range(1, len(done) + 3))  # continued at the next epoch, none twice
    assert run.data.tags["resumed.training.epochs"] == str(len(done) + 2)
    assert f"runs/{killed.info.run_id}" in caplog.text  # the run page, at the end
