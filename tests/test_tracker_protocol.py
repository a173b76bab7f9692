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
from cxrtrack.tracking.base import RUN_CALLS, Attachable, BaseTracker, Pingable
from cxrtrack.tracking.mlflow_tracker import MLflowTracker
from cxrtrack.tracking.spool import SpoolingTracker
from cxrtrack.tracking.wandb_tracker import WandbTracker
from tests.conftest import ROOT
from tests.test_spool import Recorder, predictions

BACKENDS = (MLflowTracker, WandbTracker, SpoolingTracker, TrackerGroup)


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

    allowed = {"src/cxrtrack/tuning/wandb_sweep.py", "scripts/mlflow_ui.py"}
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
