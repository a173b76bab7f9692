"""The spool's contract, fast: a backend that refuses calls while ``down`` (a stand-in for any store) behind a
SpoolingTracker. The real faults (a killed server, a full disk) are in test_outage.py and test_run_endings.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cxrtrack.tracking import TrackerGroup
from cxrtrack.tracking.base import RUN_CALLS, BaseTracker, Predictions, RunInfo, call_arguments, forwards
from cxrtrack.tracking.spool import Spool, SpoolError, SpoolingTracker, send_record
from tests.conftest import fill_disk, small_filesystem


class Flaky(BaseTracker):
    """Records what it is sent; raises ConnectionError while ``down``."""

    name = "flaky"

    def __init__(self):
        self.down = False
        self.got: list[tuple] = []

    def _take(self, *call):
        if self.down:
            raise ConnectionError("store unreachable")
        self.got.append(call)

    def start_run(self, run):
        self._take("start_run", run.name)

    def log_params(self, params):
        self._take("log_params", params)

    def log_metrics(self, metrics, step, timestamp_ms=None):
        self._take("log_metrics", metrics, step)

    def log_summary(self, metrics):
        self._take("log_summary", metrics)

    def set_tags(self, tags):
        self._take("set_tags", tags)

    def log_artifact(self, path, artifact_path=None):
        self._take("log_artifact", path.name, path.read_bytes(), artifact_path)

    def log_image(self, path, name, caption=None):
        self._take("log_image", path.name, name, caption)

    def log_table(self, name, rows):
        self._take("log_table", name, rows)

    def log_predictions(self, predictions):
        self._take("log_predictions", predictions.y_pred.tolist(), predictions.paths)

    def log_model(self, model, checkpoint, input_example, metadata):
        self._take("log_model", checkpoint.name, input_example.shape, metadata)

    def end_run(self, status="FINISHED"):
        self._take("end_run", status)

    def ping(self):
        return not self.down


def started(tmp_path, interval=0.0):
    flaky = Flaky()
    spooling = SpoolingTracker(flaky, tmp_path / "outputs", reconnect_interval=interval)
    spooling.start_run(RunInfo("run-1", {}, {}))
    return flaky, spooling


def predictions():
    return Predictions(("a", "b"), np.array([0, 1]), np.array([1, 1]), np.array([[0.4, 0.6], [0.1, 0.9]]),
                       ["x.png", "y.png"], np.zeros((2, 4, 4), np.uint8))


def test_the_end_of_run_drain_happens_on_a_machine_booted_seconds_ago(tmp_path, monkeypatch):
    """time.monotonic() counts from boot on Linux: a machine up for less than reconnect_interval must still get the
    end-of-run last chance (it was skipped when "never tried" was encoded as 0.0)."""
    clock = [5.0]  # five seconds after boot
    monkeypatch.setattr("cxrtrack.tracking.spool.time.monotonic", lambda: clock[0])
    flaky, spooling = started(tmp_path, interval=3600)
    flaky.down = True
    spooling.log_metrics({"loss": 0.5}, 1)
    clock[0] += 1.0
    flaky.down = False
    spooling.end_run("FINISHED")
    assert [c[0] for c in flaky.got] == ["start_run", "log_metrics", "end_run"]
    assert spooling.spool.pending() == []


def test_calls_go_to_the_spool_while_down_and_are_sent_in_order_when_it_answers(tmp_path):
    flaky, spooling = started(tmp_path, interval=3600)  # no reconnect before the end
    artifact = tmp_path / "history.json"
    artifact.write_text('{"epochs": []}')
    spooling.log_metrics({"loss": 1.0}, 1)
    flaky.down = True
    spooling.log_metrics({"loss": 0.5}, 2)
    artifact.write_text("changed after the call")  # the spool holds the file as it was at the call
    spooling.log_metrics({"loss": 0.25}, 3)
    spooling.log_artifact(tmp_path / "history.json")
    spooling.log_predictions(predictions())
    spooling.log_table("study/trials", [{"trial": np.int64(0), "value": 0.5, "state": "COMPLETE"}])
    assert [r["seq"] for r in spooling.spool.records()] == [1, 2, 3, 4, 5]
    flaky.down = False
    spooling.end_run("FINISHED")  # the last chance: the spool is sent first, then the status
    assert [c[0] for c in flaky.got] == ["start_run", "log_metrics", "log_metrics", "log_metrics", "log_artifact",
                                         "log_predictions", "log_table", "end_run"]
    assert [c[2] for c in flaky.got if c[0] == "log_metrics"] == [1, 2, 3]
    assert ("log_artifact", "history.json", b"changed after the call", None) in flaky.got
    assert ("log_table", "study/trials", [{"trial": 0, "value": 0.5, "state": "COMPLETE"}]) in flaky.got
    assert spooling.spool.pending() == [] and spooling.replayed == spooling.spooled == 5


def test_a_store_down_at_the_end_keeps_everything_and_the_status_last(tmp_path):
    flaky, spooling = started(tmp_path)
    flaky.down = True
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    spooling.log_metrics({"loss": 0.5}, 1)
    spooling.log_image(checkpoint, "plots/x.png", "a caption")
    spooling.log_model(None, checkpoint, np.ones((2, 1, 4, 4), np.float32), {"best_epoch": np.int64(1)})
    spooling.end_run("KILLED")
    pending = spooling.spool.pending()
    assert [r["method"] for r in pending] == ["log_metrics", "log_image", "log_model", "end_run"]
    assert pending[-1]["args"] == {"status": "KILLED"}
    assert (spooling.spool.root / pending[1]["args"]["path"]).read_bytes() == b"weights"
    assert [c.method for c in spooling.unsaved()] == ["log_metrics", "log_image", "log_model", "end_run"]
    meta = json.loads((spooling.spool.root / "spool.json").read_text())
    assert meta["backend"] == "flaky" and meta["run_name"] == "run-1"


def test_sending_twice_sends_nothing_twice(tmp_path):
    flaky, spooling = started(tmp_path, interval=3600)
    flaky.down = True
    for step in (1, 2):
        spooling.log_metrics({"loss": 1.0 / step}, step)
    spooling.end_run("FINISHED")
    flaky.down = False
    spool = spooling.spool
    for record in spool.pending():
        send_record(flaky, spool, record)
        spool.mark_done(record["seq"])
    assert spool.pending() == []
    sent = len(flaky.got)
    for record in spool.pending():  # nothing left
        send_record(flaky, spool, record)
    assert len(flaky.got) == sent


def test_a_record_cut_short_by_a_kill_is_ignored_but_a_damaged_one_is_an_error(tmp_path):
    flaky, spooling = started(tmp_path)
    flaky.down = True
    spooling.log_metrics({"loss": 1.0}, 1)
    with open(spooling.spool.journal, "a") as f:
        f.write('{"seq": 2, "method": "log_met')  # the process was killed while writing
    assert [r["seq"] for r in Spool(spooling.spool.root).records()] == [1]
    with open(spooling.spool.journal, "a") as f:
        f.write('\n{"seq": 3, "method": "end_run", "time_ms": 0, "args": {"status": "FINISHED"}}\n')
    with pytest.raises(SpoolError, match="line 2 is damaged"):
        Spool(spooling.spool.root).records()


def test_a_spool_on_a_full_disk_is_a_loss_the_group_reports(tmp_path):
    with small_filesystem(tmp_path / "small", "1m") as small:
        flaky = Flaky()
        spooling = SpoolingTracker(flaky, small, reconnect_interval=3600)
        group = TrackerGroup([spooling])
        group.start_run(RunInfo("run-1", {}, {}))
        fill_disk(small)
        flaky.down = True
        big = tmp_path / "big.bin"
        big.write_bytes(b"x" * 2**20)
        group.log_artifact(big)
        group.log_metrics({"loss": 1.0}, 1)
        assert group.errors["flaky"] >= 1
        problems = group.problems()["flaky"]
        assert "not saved" in problems and "could not write to the spool" in problems, problems
        assert not list((spooling.spool.root / "files").glob("*/*/big.bin"))  # no half-copied file left


def test_the_wrapped_backend_gets_the_whole_run_description(tmp_path):
    """Everything in RunInfo reaches the store behind the spool (a study reopens its parent run by ``resume``)."""
    got = []
    flaky = Flaky()
    flaky.start_run = got.append
    run = RunInfo("run-1", {"a": 1}, {"t": "v"}, group="g", job_type="study", parents={"flaky": "p"},
                  description="d", resume={"flaky": "run-id"})
    SpoolingTracker(flaky, tmp_path / "outputs").start_run(run)
    sent = got[0]
    assert sent.resume == {"flaky": "run-id"} and sent.parents == {"flaky": "p"}
    assert (sent.group, sent.job_type, sent.description, sent.config) == ("g", "study", "d", {"a": 1})
    assert sent.tags["t"] == "v" and len(sent.tags) == 2  # plus the spool's own tag


# -- the journal is generic: any run call goes in by name and comes back as the same call -------------------------


class Recorder(BaseTracker):
    """Keeps each call with its arguments by name (as send_record passes them)."""

    name = "mlflow"

    def __init__(self):
        self.got: list[tuple[str, dict]] = []

    def start_run(self, run):
        pass

    def _call(self, method, *args, **kwargs):
        self.got.append((method, call_arguments(method, args, kwargs)))


Recorder = forwards(*RUN_CALLS, "flush", "end_run")(Recorder)


def tiny_checkpoint(path):
    import torch

    from cxrtrack.models.cxrnet import CustomCXRNet

    model = CustomCXRNet(num_classes=3, in_channels=1, image_size=32)
    torch.save({"model_hparams": model.hparams, "model_state": model.state_dict()}, path)
    return model


def test_every_run_call_comes_back_from_the_journal_as_it_was_made(tmp_path):
    """Each call of RUN_CALLS, spooled while the store is down, is sent back with the same arguments by name:
    files as they were at the call, arrays equal, the model rebuilt from its checkpoint, the metrics' time kept."""
    flaky, spooling = started(tmp_path, interval=3600)
    flaky.down = True
    art = tmp_path / "report.json"
    art.write_text("as sent")
    model = tiny_checkpoint(tmp_path / "best.pt")
    example = np.ones((2, 1, 32, 32), np.float32)
    calls = [
        ("log_params", ({"training": {"lr": 0.01}},), {}),
        ("log_dataset", ({"name": "cxr-x", "splits": {"train": {"a": 1}}},), {}),
        ("log_metrics", ({"loss": np.float32(0.5)}, 1), {}),
        ("log_metrics", ({"loss": 0.25},), {"step": 2, "timestamp_ms": 1234}),
        ("log_summary", ({"best_epoch": 2, "test/auc": float("nan")},), {}),
        ("set_tags", ({"k": "v"},), {}),
        ("log_artifact", (art, "reports"), {}),
        ("log_image", (art,), {"name": "plots/a.png"}),
        ("log_table", ("cv/folds", [{"fold": np.int64(1), "acc": 0.5}]), {}),
        ("log_predictions", (predictions(),), {}),
        ("log_model", (model, tmp_path / "best.pt", example, {"best_epoch": 2}), {}),
    ]
    assert sorted({c[0] for c in calls}) == sorted(RUN_CALLS)  # a new run call needs a case here
    before = int(time.time() * 1000)
    for method, args, kwargs in calls:
        getattr(spooling, method)(*args, **kwargs)
    art.write_text("changed after the call")
    spooling.end_run("FINISHED")

    recorder = Recorder()
    for record in spooling.spool.pending():
        send_record(recorder, spooling.spool, record)
    assert [m for m, _ in recorder.got] == [c[0] for c in calls] + ["end_run"]
    got = dict(recorder.got[:2]) | {m: a for m, a in recorder.got[4:]}
    assert got["log_params"] == {"params": {"training": {"lr": 0.01}}}
    first, second = recorder.got[2][1], recorder.got[3][1]
    assert first["metrics"] == {"loss": 0.5} and first["step"] == 1 and first["timestamp_ms"] >= before
    assert second == {"metrics": {"loss": 0.25}, "step": 2, "timestamp_ms": 1234}
    assert got["log_summary"]["metrics"]["best_epoch"] == 2 and np.isnan(got["log_summary"]["metrics"]["test/auc"])
    assert got["log_artifact"]["path"].read_text() == "as sent" and got["log_artifact"]["artifact_path"] == "reports"
    assert got["log_image"]["path"].name == "report.json" and got["log_image"]["caption"] is None
    assert got["log_table"] == {"name": "cv/folds", "rows": [{"fold": 1, "acc": 0.5}]}
    sent, back = predictions(), got["log_predictions"]["predictions"]
    assert back.class_names == sent.class_names and back.paths == sent.paths
    for name in ("y_true", "y_pred", "probs", "images"):
        assert np.array_equal(getattr(back, name), getattr(sent, name))
        assert getattr(back, name).dtype == getattr(sent, name).dtype
    rebuilt = got["log_model"]["model"]
    assert type(rebuilt) is type(model)
    assert all(np.array_equal(a.detach().numpy(), b.detach().numpy())
               for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values(), strict=True))
    assert np.array_equal(got["log_model"]["input_example"], example)
    assert got["log_model"]["metadata"] == {"best_epoch": 2}
    assert got["end_run"] == {"status": "FINISHED"}


def test_a_spooled_fold_ensemble_upload_comes_back_as_the_ensemble(tmp_path):
    """A cross-validation's final model is a fold ensemble (``kind: ensemble``, one state per fold, no
    ``model_state``). Spooled, its upload is replayed with the same ensemble, predicting the same, not a KeyError
    (the tuning study's best CV trial was stuck in the spool this way)."""
    import torch

    from cxrtrack.models.cxrnet import CustomCXRNet
    from cxrtrack.models.ensemble import Ensemble

    members = [CustomCXRNet(num_classes=3, in_channels=1, image_size=32) for _ in range(2)]
    ensemble = Ensemble(members).eval()
    path = tmp_path / "ensemble.pt"
    torch.save({"kind": "ensemble", "members": [m.state_dict() for m in members],
                "model_hparams": members[0].hparams, "cv": {"chosen_epoch": 3}}, path)
    flaky, spooling = started(tmp_path, interval=3600)
    flaky.down = True
    example = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    spooling.log_model(ensemble, path, example, {"best_epoch": 3})
    spooling.end_run("FINISHED")

    recorder = Recorder()
    for record in spooling.spool.pending():
        send_record(recorder, spooling.spool, record)
    assert [m for m, _ in recorder.got] == ["log_model", "end_run"]
    rebuilt = recorder.got[0][1]["model"]
    assert isinstance(rebuilt, Ensemble) and len(rebuilt.members) == 2
    with torch.no_grad():
        assert torch.allclose(rebuilt(torch.from_numpy(example)), ensemble(torch.from_numpy(example)))


# -- journals written before the journal was generic (spool version 1) still replay ----------------------------------

# Written by cxrtrack at f3b6c64 (the spool's first format), byte for byte: a SpoolingTracker in front of a backend
# that refused every call, then the calls a run makes. Only the run reference in spool.json is filled in by the test.
V1_JOURNAL = r"""
{"seq": 1, "method": "log_params", "time_ms": 1796554115344, "args": {"params": {"extra": {"a": 1}}}}
{"seq": 2, "method": "log_dataset", "time_ms": 1796554115349, "args": {"dataset": {"name": "cxr-synthetic", "source": "synthetic", "fingerprint": "ffffffffffffffff", "root": "/data", "test_split": "folder", "splits": {"train": {"a": 2}}}}}
{"seq": 3, "method": "log_metrics", "time_ms": 1796554115353, "args": {"metrics": {"loss": 0.5, "acc": 0.25}, "step": 1}}
{"seq": 4, "method": "log_metrics", "time_ms": 1796554115357, "args": {"metrics": {"loss": 0.25}, "step": 2}}
{"seq": 5, "method": "log_summary", "time_ms": 1796554115361, "args": {"metrics": {"best_epoch": 2.0, "test/acc": NaN}}}
{"seq": 6, "method": "set_tags", "time_ms": 1796554115365, "args": {"tags": {"note": "v1"}}}
{"seq": 7, "method": "log_artifact", "time_ms": 1796554115369, "args": {"artifact_path": "reports", "path": "files/000007/path/history.json"}}
{"seq": 8, "method": "log_image", "time_ms": 1796554115373, "args": {"name": "plots/x.png", "caption": "cap", "path": "files/000008/path/x.png"}}
{"seq": 9, "method": "log_table", "time_ms": 1796554115377, "args": {"name": "cv/folds", "rows": [{"fold": 1, "acc": 0.5}]}}
{"seq": 10, "method": "log_predictions", "time_ms": 1796554115382, "args": {"class_names": ["a", "b", "c"], "paths": ["x.png", "y.png"], "extra": {"n_grid": 2}, "arrays": "files/000010/arrays.npz"}}
{"seq": 11, "method": "log_model", "time_ms": 1796554115396, "args": {"metadata": {"best_epoch": 2, "registry": {"register": false, "reason": "test"}}, "checkpoint": "files/000011/checkpoint/best.pt", "input_example": "files/000011/input_example.npz"}}
{"seq": 12, "method": "end_run", "time_ms": 1796554115419, "args": {"status": "FINISHED"}}
"""  # noqa: E501 - the file as version 1 wrote it, one JSON record a line: its lines are not rewrapped
V1_PREDICTIONS = {"y_true": np.array([0, 1]), "y_pred": np.array([1, 1]),
                  "probs": np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]), "images": np.zeros((2, 4, 4), np.uint8)}


def write_v1_spool(root, ref):
    """A spool folder as version 1 left it on a user's disk: spool.json, journal.jsonl and files/<seq>/."""
    root.mkdir(parents=True)
    (root / "spool.json").write_text(json.dumps({
        "version": 1, "backend": "mlflow", "run_name": "run-v1", "ref": ref, "experiment": None, "tracker_cfg": {},
        "process": {"pid": 2**22 + 1, "created": "2026-12-06T10:48:35+00:00"}}, indent=1))
    (root / "journal.jsonl").write_text(V1_JOURNAL.lstrip())
    for seq, name, text in (("000007", "history.json", '{"epochs": [1]}'), ("000008", "x.png", "not really a png")):
        (root / "files" / seq / "path").mkdir(parents=True)
        (root / "files" / seq / "path" / name).write_text(text)
    (root / "files" / "000010").mkdir()
    np.savez(root / "files" / "000010" / "arrays.npz", **V1_PREDICTIONS)
    (root / "files" / "000011" / "checkpoint").mkdir(parents=True)
    model = tiny_checkpoint(root / "files" / "000011" / "checkpoint" / "best.pt")
    np.savez(root / "files" / "000011" / "input_example.npz", input_example=np.zeros((1, 1, 32, 32), np.float32))
    return model


def test_a_version_1_journal_is_sent_as_the_same_calls(tmp_path):
    root = tmp_path / "outputs" / "run-v1" / "spool" / "mlflow"
    model = write_v1_spool(root, {"tracking_uri": "sqlite:///x.db", "experiment_id": "1", "run_id": "abc"})
    spool, recorder = Spool(root), Recorder()
    for record in spool.pending():
        send_record(recorder, spool, record)
    assert [m for m, _ in recorder.got] == ["log_params", "log_dataset", "log_metrics", "log_metrics", "log_summary",
                                            "set_tags", "log_artifact", "log_image", "log_table", "log_predictions",
                                            "log_model", "end_run"]
    got = [a for _, a in recorder.got]
    # the metric points keep the time they were computed (version 1 kept it only as the record's time)
    assert got[2] == {"metrics": {"loss": 0.5, "acc": 0.25}, "step": 1, "timestamp_ms": 1796554115353}
    assert got[3]["timestamp_ms"] == 1796554115357
    assert got[6]["path"].read_text() == '{"epochs": [1]}' and got[6]["artifact_path"] == "reports"
    assert got[7]["path"].name == "x.png" and (got[7]["name"], got[7]["caption"]) == ("plots/x.png", "cap")
    p = got[9]["predictions"]
    assert p.class_names == ("a", "b", "c") and p.paths == ["x.png", "y.png"] and p.extra == {"n_grid": 2}
    assert all(np.array_equal(getattr(p, k), v) for k, v in V1_PREDICTIONS.items())
    assert type(got[10]["model"]) is type(model) and got[10]["input_example"].shape == (1, 1, 32, 32)
    assert got[10]["metadata"]["registry"] == {"register": False, "reason": "test"}
    assert got[11] == {"status": "FINISHED"}


@pytest.mark.slow
def test_a_version_1_journal_replays_into_a_real_mlflow_store(tmp_path, migrated_mlflow_db):
    """`make replay` on a spool that version 1 left behind: everything reaches a real SQLite store, read back."""
    import mlflow

    from cxrtrack.tracking.readback import read_mlflow
    from cxrtrack.tracking.replay import replay_spool

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("v1", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(experiment_id, run_name="run-v1").info.run_id
    root = tmp_path / "outputs" / "run-v1" / "spool" / "mlflow"
    write_v1_spool(root, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id})

    result = replay_spool(root)
    assert result.complete and result.sent == 12, result
    stored = read_mlflow(uri, run_id, epoch_metrics=["loss", "acc"])
    assert stored.status == "FINISHED" and stored.params == {"extra.a": "1"} and stored.tags["note"] == "v1"
    assert stored.metrics == {"loss": [(1, 0.5), (2, 0.25)], "acc": [(1, 0.25)]}
    assert [m.timestamp for m in client.get_metric_history(run_id, "loss")] == [1796554115353, 1796554115357]
    assert stored.summary == {"best_epoch": 2.0}  # NaN (an undefined metric) is not stored, as for a live run
    assert "reports/history.json" in stored.artifacts and stored.images == ["plots/x.png"]
    assert stored.tables == {"cv/folds": 1, "test/predictions": 2} and len(stored.models) == 1
    assert stored.extra["dataset_inputs"] == ["cxr-synthetic-train"]
    assert replay_spool(root).sent == 0  # idempotent
