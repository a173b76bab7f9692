"""The spool's contract, fast: a backend that refuses calls while ``down`` (a stand-in for any store) behind a
SpoolingTracker. The real faults (a killed server, a full disk) are in test_outage.py and test_run_endings.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrtrack.tracking import TrackerGroup
from cxrtrack.tracking.base import BaseTracker, Predictions, RunInfo
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

    def log_metrics(self, metrics, step):
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
