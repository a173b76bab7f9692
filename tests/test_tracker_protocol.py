"""The tracker interface, fast and without a store: every backend takes every run call by the names the
interface declares (the journal sends calls back by name), the wrappers forward every call without listing it,
the optional capabilities are declared, and the architecture doc says why each method exists."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cxrtrack.tracking import TrackerGroup
from cxrtrack.tracking.base import RUN_CALLS, Attachable, BaseTracker, Pingable, RecordingTracker, RunInfo
from cxrtrack.tracking.mlflow_tracker import MLflowTracker
from cxrtrack.tracking.readback import RunRecord, diff_records, total_lost
from cxrtrack.tracking.spool import SpoolingTracker
from cxrtrack.tracking.wandb_tracker import WandbTracker
from tests.conftest import ROOT
from tests.test_spool import Recorder, predictions

BACKENDS = (MLflowTracker, WandbTracker, SpoolingTracker, TrackerGroup, RecordingTracker)


def names(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_every_backend_takes_every_run_call_by_the_declared_names(cls):
    """A journaled call is sent back as ``getattr(backend, method)(**args)``: a parameter named differently in a
    backend would make replay fail long after the run."""
    assert not inspect.isabstract(cls)
    for method in (*RUN_CALLS, "end_run", "flush"):
        assert names(getattr(cls, method)) == names(getattr(BaseTracker, method)), (cls.__name__, method)


def test_the_optional_capabilities_are_declared(tmp_path):
    mlflow = MLflowTracker("e", {"tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    assert isinstance(mlflow, Pingable) and isinstance(mlflow, Attachable)
    assert not isinstance(WandbTracker("p", {}), Pingable)
    assert not isinstance(Recorder(), Pingable) and not isinstance(Recorder(), Attachable)


def test_the_group_forwards_every_run_call_to_every_backend_with_its_arguments(tmp_path):
    a, b = Recorder(), Recorder()
    b.name = "other"
    group = TrackerGroup([a, b])
    art = tmp_path / "f.txt"
    art.write_text("x")
    group.log_params({"p": 1})
    group.log_dataset({"name": "d"})
    group.log_metrics({"loss": 1.0}, step=1)
    group.log_summary({"acc": 0.5})
    group.set_tags({"t": "v"})
    group.log_artifact(art, "reports")
    group.log_image(art, "plots/f.png", caption="c")
    group.log_table("t", [{"a": 1}])
    group.log_predictions(predictions())
    group.log_model(None, art, np.zeros((2, 1)), {"m": 1})
    group.flush()
    group.end_run("KILLED")
    assert [m for m, _ in a.got] == [*RUN_CALLS, "flush", "end_run"]
    assert [m for m, _ in a.got] == [m for m, _ in b.got]
    assert a.got[2] == ("log_metrics", {"metrics": {"loss": 1.0}, "step": 1, "timestamp_ms": None})
    assert a.got[6] == ("log_image", {"path": art, "name": "plots/f.png", "caption": "c"})
    assert set(group.call_times["mlflow"]) == {*RUN_CALLS, "flush", "end_run"}
    assert group.status == "KILLED" and not group.errors


def test_a_failing_call_is_described_with_its_epoch():
    class Down(Recorder):
        def _call(self, method, *args, **kwargs):
            raise ConnectionError("gone")

    group = TrackerGroup([Down()])
    group.log_metrics({"loss": 1.0}, 3)
    group.log_metrics({"loss": 1.0}, step=4)
    assert [(c.method, c.step) for c in group.failed["mlflow"]] == [("log_metrics", 3), ("log_metrics", 4)]
    assert "metrics of epochs 3-4 not saved" in group.problems()["mlflow"]


def test_the_architecture_doc_says_why_each_method_exists():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("## The tracker interface", 1)[1].split("\n## ", 1)[0]
    public = [n for n, _ in inspect.getmembers(BaseTracker, inspect.isfunction) if not n.startswith("_")]
    protocols = [n for p in (Pingable, Attachable) for n in vars(p) if not n.startswith("_")]
    for name in ["name", *public, *protocols]:
        assert re.search(rf"[`.]{name}[(`]", section), f"docs/architecture.md does not say why {name} exists"


@pytest.mark.slow
def test_attached_adds_to_a_finished_mlflow_run_and_leaves_its_status_alone(tmp_path):
    """`make evaluate` reports back through attached(): the calls reach the closed run, which stays FINISHED with
    its end time, and nothing else is created in the store (no new run, no reopened run)."""
    import mlflow

    from cxrtrack.tracking import attached

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "eval/x", 0.1, step=1)
    client.set_terminated(run_id, "FINISHED")
    ended = client.get_run(run_id).info.end_time
    report = tmp_path / "metrics.json"
    report.write_text("{}")
    for _ in range(2):
        with attached("mlflow", {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}) as run:
            run.log_metrics({"eval/x": 0.5}, run.last_step("eval/x") + 1, timestamp_ms=1234)
            run.log_table("evaluations/fp", [{"acc": 0.5}])
            run.log_artifact(report, "evaluations/fp")
            run.set_tags({"eval.last": "now"})
            assert mlflow.active_run() is None
    stored = client.get_run(run_id)
    assert (stored.info.status, stored.info.end_time) == ("FINISHED", ended)
    assert sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "eval/x"))[1:] == \
        [(2, 0.5, 1234), (3, 0.5, 1234)]
    assert stored.data.tags["eval.last"] == "now"
    assert {f.path for f in client.list_artifacts(run_id, "evaluations")} == {"evaluations/fp", "evaluations/fp.json"}
    table = json.loads(Path(client.download_artifacts(run_id, "evaluations/fp.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 2  # the second evaluation is appended
    assert len(client.search_runs([experiment_id])) == 1


def test_only_the_tracking_package_imports_the_clients():
    """docs/architecture.md: training, selection, evaluation and Optuna tuning reach the stores through tracking/.
    The exceptions are named there: benchmark/ (times the raw clients), the MLflow UI script, the online sweep."""
    import ast

    allowed = {"src/cxrtrack/tuning/wandb_sweep.py", "src/cxrtrack/cli/mlflow_ui.py"}
    found = []
    for path in sorted([*(ROOT / "src" / "cxrtrack").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("src/cxrtrack/tracking/", "src/cxrtrack/benchmark/")) or rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{rel}:{node.lineno} {m}" for m in modules if m.split(".")[0] in ("mlflow", "wandb")]
    assert found == []


# -- tracked.json: the RecordingTracker every group keeps ---------------------------------------------------------


def assert_same_record(recorded: RunRecord, sent: RunRecord) -> None:
    """A group's record and a record written by hand (tracked.json) hold the same items, both ways (the project's
    own diff, as for a store), with the same run name and dataset lineage."""
    assert recorded.name == sent.name and recorded.extra.get("dataset") == sent.extra.get("dataset")
    for a, b in ((sent, recorded), (recorded, sent)):
        sections = diff_records(a, b, "recorded")
        assert total_lost(sections) == 0, {k: (v.missing, v.mismatched) for k, v in sections.items() if v.lost}
        assert len(a.models) == len(b.models) and a.tables == b.tables


def test_the_group_records_what_the_run_sent_even_when_every_backend_fails(tmp_path):
    class Down(Recorder):
        def _call(self, method, *args, **kwargs):
            raise ConnectionError("gone")

    group = TrackerGroup([Down()])
    group.start_run(RunInfo("run-1", {"data": {"image_size": 64}, "training": {"lr": 0.01, "extra": {}}},
                            {"git_commit": "abc"}))
    report = tmp_path / "metrics.json"
    report.write_text("{}")
    group.log_params({"model": {"num_parameters": 123}})
    group.log_dataset({"name": "cxr-synthetic", "fingerprint": "f" * 16})
    for epoch in (1, 2):
        group.log_metrics({"train/loss": np.float32(1.0 / epoch), "val/acc": 0.5}, step=epoch)
    group.log_image(report, "samples/train_batch_augmented.png", caption="c")
    group.log_summary({"best_epoch": 2, "test/roc_auc_ovr_macro": float("nan")})
    group.log_image(report, "plots/roc_curves.png")
    group.log_artifact(report, "reports")
    group.log_artifact(report)
    group.log_artifact(report, "reports")  # the same file again: the store holds it once
    group.log_predictions(predictions())
    group.log_table("cv/folds", [{"fold": 1}, {"fold": 2}])
    group.log_model(None, report, np.zeros((2, 1)), {})
    group.set_tags({"cv_final_model": "ensemble"})
    group.end_run("KILLED")

    record = group.record
    assert group.errors["mlflow"] == 15  # every call after the start failed in the backend...
    assert (record.name, record.status) == ("run-1", "KILLED")  # ...and the record has them all
    assert record.params == {"data.image_size": 64, "training.lr": 0.01, "training.extra": {},
                             "model.num_parameters": 123}
    assert record.metrics == {"train/loss": [(1, 1.0), (2, 0.5)], "val/acc": [(1, 0.5), (2, 0.5)]}
    assert record.summary["best_epoch"] == 2 and np.isnan(record.summary["test/roc_auc_ovr_macro"])
    assert record.tags == {"git_commit": "abc", "cv_final_model": "ensemble"}
    assert record.artifacts == ["metrics.json", "reports/metrics.json"]
    assert record.images == ["plots/roc_curves.png", "samples/train_batch_augmented.png"]
    assert record.tables == {"test/predictions": 2, "cv/folds": 2} and record.models == ["CustomCXRNet"]
    assert record.extra == {"dataset": {"name": "cxr-synthetic", "fingerprint": "f" * 16}}
    assert "recorded" not in group.names and "recorded" not in group.call_times  # not a backend: no run_ref, no cost
    back = RunRecord.from_json(record.to_json())  # as tracked.json holds it
    assert_same_record(back, record)


def test_a_failing_record_never_stops_the_run(monkeypatch):
    a = Recorder()
    group = TrackerGroup([a])
    monkeypatch.setattr(group.recorder, "log_metrics", lambda *args, **kwargs: 1 / 0)
    group.log_metrics({"loss": 1.0}, 1)
    assert a.got == [("log_metrics", {"metrics": {"loss": 1.0}, "step": 1, "timestamp_ms": None})]
    assert not group.errors


def test_record_only_reaches_the_record_not_the_backends_and_never_raises(monkeypatch):
    a = Recorder()
    group = TrackerGroup([a])
    group.record_only("log_metrics", {"loss": 0.5}, 1)  # a resumed run's earlier epoch: in the stores already
    assert a.got == [] and group.record.metrics == {"loss": [(1, 0.5)]}
    monkeypatch.setattr(group.recorder, "log_metrics", lambda *args, **kwargs: 1 / 0)
    group.record_only("log_metrics", {"loss": 0.4}, 2)
    assert a.got == [] and not group.errors and group.record.metrics == {"loss": [(1, 0.5)]}
