"""How a run ends, read back from both trackers: Ctrl-C -> KILLED, a crash -> FAILED, and a broken
tracker never stops training. These runs use both trackers at once (the fan-out)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from cxrtrack.errors import TrackerError
from cxrtrack.tracking import BaseTracker, TrackerGroup, build_tracker
from cxrtrack.training.run import run_experiment
from cxrtrack.training.trainer import Trainer
from tests.conftest import wandb_leet

# migrated_mlflow_db: tmp_path/mlflow.db, the store these runs use, starts as an empty store at the current schema
# (no test here is about creating a store: that is test_concurrency's)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("migrated_mlflow_db")]


def wandb_exit(run_dir: Path) -> dict:
    return json.loads(wandb_leet(run_dir, "--summary"))


def mlflow_run(cfg, tracker):
    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["mlflow"]["tracking_uri"])
    return client, client.get_run(tracker.run_id)


def test_ctrl_c_ends_the_run_killed_and_keeps_the_checkpoint(tiny_cfg, monkeypatch):
    tiny_cfg["tracking"]["tracker"] = "both"
    real_epoch = Trainer.train_one_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", interrupted_in_epoch_2)
    result = run_experiment(tiny_cfg)

    assert result.status == "KILLED"
    assert len(result.fit.history) == 1 and result.test is None
    assert torch.load(result.fit.checkpoint, weights_only=True)["epoch"] == 1
    mlflow_tracker, wandb_tracker = result.tracker.trackers
    client, run = mlflow_run(tiny_cfg, mlflow_tracker)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1]
    assert "checkpoints/best.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert client.search_model_versions(f"run_id='{run.info.run_id}'") == []  # a killed run registers nothing
    summary = wandb_exit(wandb_tracker.run_dir)
    assert summary["exit_code"] == 130 and summary["summary"]["status"] == "KILLED"


def test_a_crash_ends_the_run_failed_and_keeps_what_was_learnt(tiny_cfg, monkeypatch, tmp_path):
    tiny_cfg["tracking"]["tracker"] = "both"
    real_epoch = Trainer.train_one_epoch

    def crash_in_epoch_2(self, epoch):
        if epoch == 2:
            raise RuntimeError("simulated crash in the training loop")
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", crash_in_epoch_2)
    group = build_tracker("both", tiny_cfg)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_cfg, tracker=group)
    assert group.status == "FAILED"
    client, run = mlflow_run(tiny_cfg, group.trackers[0])
    assert run.info.status == "FAILED"
    # epoch 1's history and best checkpoint reached the tracker before the run was closed
    history = json.loads(open(client.download_artifacts(run.info.run_id, "history.json", str(tmp_path))).read())
    assert [row["epoch"] for row in history["epochs"]] == [1] and history["status"] == "FAILED"
    assert "checkpoints/best.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    summary = wandb_exit(group.trackers[1].run_dir)
    assert summary["state"] == "failed" and summary["exit_code"] == 1


class ExplodingTracker(BaseTracker):
    """A backend that fails at every call after start (a dead server, a full disk, ...)."""

    name = "exploding"

    def __init__(self):
        self.calls = 0

    def start_run(self, run):
        pass

    def _boom(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("tracking server went away")

    log_params = log_metrics = log_summary = set_tags = log_artifact = _boom
    log_image = log_predictions = log_model = end_run = _boom


def test_a_failing_tracker_never_kills_training(tiny_cfg):
    exploding = ExplodingTracker()
    group = TrackerGroup([exploding, *build_tracker("mlflow", tiny_cfg).trackers])
    result = run_experiment(tiny_cfg, tracker=group)

    assert result.status == "FINISHED" and result.test is not None
    assert len(result.fit.history) == tiny_cfg["training"]["epochs"]
    assert group.errors["exploding"] == exploding.calls > 0
    assert group.errors["mlflow"] == 0
    client, run = mlflow_run(tiny_cfg, group.trackers[1])  # the healthy tracker got everything
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == tiny_cfg["training"]["epochs"]


def test_a_tracker_that_cannot_start_fails_before_training(tiny_cfg, tmp_path, monkeypatch):
    tiny_cfg["tracking"]["tracker"] = "mlflow"
    (tmp_path / "a-file").write_text("not a folder")
    tiny_cfg["tracking"]["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/a-file/mlflow.db"  # cannot be created
    trained = []
    monkeypatch.setattr(Trainer, "fit", lambda self: trained.append(1))
    with pytest.raises(TrackerError, match="Could not start the mlflow run.*--tracker none"):
        run_experiment(tiny_cfg)
    assert trained == []


def test_group_context_manager_statuses():
    class Recorder(ExplodingTracker):
        name = "recorder"

        def __init__(self):
            self.ended = []

        def end_run(self, status="FINISHED"):
            self.ended.append(status)

    for exc, status in ((None, "FINISHED"), (KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")):
        recorder = Recorder()
        try:
            with TrackerGroup([recorder]):
                if exc:
                    raise exc
        except (KeyboardInterrupt, ValueError):
            pass
        assert recorder.ended == [status]


def test_a_tracker_past_its_error_limit_still_gets_its_run_ended():
    class FailsThenRecords(ExplodingTracker):
        name = "flaky"

        def __init__(self):
            super().__init__()
            self.ended = []

        def end_run(self, status="FINISHED"):
            self.ended.append(status)

    flaky = FailsThenRecords()
    group = TrackerGroup([flaky], max_errors=3)
    for step in range(10):
        group.log_metrics({"x": 1.0}, step)
    assert flaky.calls == 3  # ignored after the limit...
    group.end_run("FINISHED")
    assert flaky.ended == ["FINISHED"]  # ...but its run is still closed
