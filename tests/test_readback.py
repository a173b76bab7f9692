"""Fidelity: read each run back from the real stores (MLflow through its client, offline W&B through
``wandb leet inspect``) and diff it against what the trainer sent. A clean run loses nothing; a backend
that silently drops a metric point, changes a param or skips an artifact is caught, in both trackers."""

from __future__ import annotations

import copy

import pytest

from cxrtrack.tracking import build_tracker
from cxrtrack.tracking.readback import RunRecord, diff_records, read_mlflow, read_wandb, total_lost
from cxrtrack.training.run import run_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, empty_mlflow_store):
    """tiny_cfg's MLflow store (tmp_path/mlflow.db), new and empty, without running MLflow's migrations again."""
    empty_mlflow_store(tmp_path / "mlflow.db")


def read_back(tracker):
    if tracker.name == "mlflow":
        return read_mlflow(tracker.tracking_uri, tracker.run_id)
    return read_wandb(tracker.run_dir)


def test_both_stores_hold_everything_the_trainer_sent(tiny_cfg):
    tiny_cfg["tracking"]["tracker"] = "both"
    result = run_experiment(tiny_cfg)
    sent = RunRecord.from_json((result.run_dir / "tracked.json").read_text())
    assert sent.metrics == result.record.metrics  # tracked.json is the record, faithfully written
    assert len(sent.metrics["val/loss"]) == tiny_cfg["training"]["epochs"]
    assert sent.tables == {"test/predictions": len(result.test.predictions.y_true)}
    for tracker in result.tracker.trackers:
        sections = diff_records(sent, read_back(tracker), tracker.name)
        assert total_lost(sections) == 0, {k: (s.missing, s.mismatched) for k, s in sections.items()}
        assert sections["metric_points"].found == sum(len(v) for v in sent.metrics.values()) > 0
        assert sections["params"].found > 50 and sections["artifacts"].found == len(sent.artifacts) > 0
        assert sections["images"].found == 5 and sections["models"].found == 1


def make_lossy(tracker):
    """Turn a real backend into one that loses one metric point, changes one param and skips one file."""

    class Lossy(type(tracker)):
        def start_run(self, run):
            run = copy.deepcopy(run)
            run.config["training"]["lr"] = 0.5
            super().start_run(run)

        def log_metrics(self, metrics, step):
            super().log_metrics({k: v for k, v in metrics.items() if not (k == "val/loss" and step == 2)}, step)

        def log_artifact(self, path, artifact_path=None):
            if path.name != "history.json":
                super().log_artifact(path, artifact_path)

    tracker.__class__ = Lossy
    return tracker


def test_the_diff_catches_a_dropped_point_a_changed_param_and_a_missing_artifact(tiny_cfg):
    group = build_tracker("both", tiny_cfg)
    for tracker in group.trackers:
        make_lossy(tracker)
    result = run_experiment(tiny_cfg, tracker=group)
    for tracker in group.trackers:
        sections = diff_records(result.record, read_back(tracker), tracker.name)
        assert sections["metric_points"].missing == ["val/loss@2"], tracker.name
        assert [m.split(":")[0] for m in sections["params"].mismatched] == ["training.lr"], tracker.name
        assert sections["artifacts"].missing == ["history.json"], tracker.name
        assert total_lost(sections) == 3, tracker.name


def test_a_tag_set_from_an_epoch_callback_reaches_tracked_json_as_it_reaches_the_store(tiny_cfg):
    """A pruned tuning trial tags its run from Optuna's epoch callback (trial_state PRUNED): tracked.json, the
    group's record of what was sent, holds every call the store got, not only the ones the run code wrote down."""
    from cxrtrack.training.trainer import StopTraining

    group = build_tracker("mlflow", tiny_cfg)
    pruned = {"trial_state": "PRUNED", "pruned_at_epoch": "1"}

    def prune(epoch, row):
        group.set_tags(pruned)
        raise StopTraining("pruned")

    result = run_experiment(tiny_cfg, tracker=group, callbacks=(prune,))
    sent = RunRecord.from_json((result.run_dir / "tracked.json").read_text())
    stored = read_back(group.trackers[0])
    assert pruned.items() <= stored.tags.items() and pruned.items() <= sent.tags.items()
    assert total_lost(diff_records(sent, stored, "mlflow")) == 0 and [s for s, _ in sent.metrics["val/loss"]] == [1]
