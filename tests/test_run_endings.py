"""Every run ends in a true state: real signals (SIGTERM, SIGINT, SIGKILL) sent to scripts/train.py, a loss that
really becomes NaN, and real full file systems (tmpfs) under the outputs, the MLflow store and the W&B folder,
each read back from the stores afterwards."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from cxrtrack.errors import NonFiniteLossError, RunFailedError
from cxrtrack.tracking import FAILED, FINISHED, KILLED
from cxrtrack.tracking.readback import diff_records, read_mlflow, total_lost
from cxrtrack.tracking.replay import replay_spool
from cxrtrack.training import scaffold
from cxrtrack.training import trainer as trainer_module
from cxrtrack.training.run import run_experiment
from cxrtrack.training.trainer import Trainer
from cxrtrack.utils import atomic_write
from tests.conftest import CONFIGS, ROOT, fill_disk, small_filesystem, wandb_leet

pytestmark = pytest.mark.slow
# Tests that train against tmp_path/mlflow.db (train_command, tiny_cfg) take migrated_mlflow_db: that store starts as an
# empty one at the current schema (no test here is about creating a store: that is test_concurrency's).
migrated_store = pytest.mark.usefixtures("migrated_mlflow_db")


def train_command(tmp_path: Path, data: Path, tracker: str, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIGS / "quick.yaml"),
            "--data", str(data), "--tracker", tracker, "--epochs", str(epochs),
            "--set", f"output_dir={tmp_path / 'outputs'}",
            "--set", f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", f"tracking.mlflow.artifact_location={tmp_path / 'mlartifacts'}",
            "--set", f"tracking.wandb.dir={tmp_path}", "--set", "tracking.mlflow.system_metrics_interval=1",
            "--set", "tracking.wandb.system_metrics_interval=1", *extra]


def start_training(tmp_path: Path, data: Path, tracker: str, epochs: int) -> tuple[subprocess.Popen, Path]:
    log_file = tmp_path / "train.log"
    proc = subprocess.Popen(train_command(tmp_path, data, tracker, epochs), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log_file, "w"))  # noqa: SIM115 - closed with the process
    return proc, log_file


def wait_for(proc: subprocess.Popen, log_file: Path, pattern: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log_file.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before {pattern!r}:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {pattern!r} within {timeout} s")


def only_mlflow_run(tmp_path: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, runs
    return client, runs[0]


def no_partial_files(folder: Path) -> None:
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())  # every JSON file present is complete


# -- signals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@migrated_store
def test_a_real_signal_ends_the_run_killed_in_both_stores(sig, code, tmp_path, tiny_data_root):
    proc, log_file = start_training(tmp_path, tiny_data_root, "both", epochs=200)
    wait_for(proc, log_file, r"epoch 1/200  train loss")
    os.kill(proc.pid, sig)
    assert proc.wait(180) == code, log_file.read_text()[-3000:]
    text = log_file.read_text()
    assert ("Terminated (SIGTERM)" if sig == signal.SIGTERM else "Interrupted (Ctrl-C)") in text, text[-3000:]
    assert "Traceback" not in text, text[-5000:]

    client, run = only_mlflow_run(tmp_path)
    assert run.info.status == KILLED, text[-3000:]
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert epochs and epochs == list(range(1, len(epochs) + 1))
    files = {f.path for f in client.list_artifacts(run.info.run_id)} | {
        f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"history.json", "checkpoints/best.pt"} <= files  # history and best checkpoint reached the tracker
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    summary = json.loads(wandb_leet(wandb_run, "--summary"))
    assert summary["exit_code"] == code and summary["summary"]["status"] == KILLED, (summary, text[-3000:])
    no_partial_files(tmp_path / "outputs")


@migrated_store
def test_sigkill_leaves_the_run_running_until_the_next_run_marks_it_killed(tmp_path, tiny_data_root, tiny_cfg, caplog):
    proc, log_file = start_training(tmp_path, tiny_data_root, "mlflow", epochs=200)
    wait_for(proc, log_file, r"epoch 1/200  train loss")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    client, killed = only_mlflow_run(tmp_path)
    assert killed.info.status == "RUNNING"  # SIGKILL cannot be caught: nothing could close it

    tiny_cfg["tracking"]["tracker"] = "mlflow"
    tiny_cfg["training"]["epochs"] = 1
    tiny_cfg["experiment"] = "another-experiment"  # any run on the store closes it, not only one of its experiment
    with caplog.at_level(logging.WARNING):
        run_experiment(tiny_cfg)  # same store (tmp_path/mlflow.db): its start looks for such runs
    after = client.get_run(killed.info.run_id)
    assert after.info.status == KILLED
    assert f"process {proc.pid}" in after.data.tags["cxrtrack.closed_by"]
    assert f"was left RUNNING by process {proc.pid}, which is gone (killed?): marked KILLED" in caplog.text


# -- a loss that becomes NaN --------------------------------------------------------------------------


@migrated_store
def test_a_real_nan_loss_stops_at_once_and_the_run_fails(tiny_cfg):
    """SGD at lr 9.9 without clipping diverges on the tiny set: the loss really becomes NaN."""
    tiny_cfg["tracking"]["tracker"] = "both"
    tiny_cfg["training"].update(lr=9.9, optimizer="sgd", grad_clip_norm=None, epochs=8)
    from cxrtrack.tracking import build_tracker

    group = build_tracker("both", tiny_cfg)
    with pytest.raises(NonFiniteLossError) as err:
        run_experiment(tiny_cfg, tracker=group)
    message = " ".join(str(err.value).split())
    for fragment in ("is nan (not a finite number)", "training.lr=9.9", "training.grad_clip_norm=null",
                     "The run is marked FAILED"):
        assert fragment in message, message
    assert err.value.exit_code == 1
    mlflow_tracker, wandb_tracker = group.trackers
    run = mlflow.MlflowClient(tiny_cfg["tracking"]["mlflow"]["tracking_uri"]).get_run(mlflow_tracker.run_id)
    assert run.info.status == FAILED
    summary = json.loads(wandb_leet(wandb_tracker.run_dir, "--summary"))
    assert summary["exit_code"] == 1 and summary["summary"]["status"] == FAILED
    run_dir = Path(tiny_cfg["output_dir"]) / run.info.run_name
    history = json.loads((run_dir / "history.json").read_text())
    assert history["status"] == FAILED and len(history["epochs"]) < 8  # stopped, not run to the end
    checkpoint = run_dir / "checkpoints" / "best.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)["model_state"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@migrated_store
def test_poisoned_weights_stop_at_the_first_batch_and_are_never_saved(tiny_cfg):
    tiny_cfg["tracking"]["tracker"] = "mlflow"
    tiny_cfg["training"]["epochs"] = 4
    seen = []

    def poison_after_epoch_1(epoch, row):
        seen.append(epoch)
        if epoch == 1:
            with torch.no_grad():
                next(poison.model.parameters()).fill_(float("nan"))

    real_init = Trainer.__init__

    def keep_trainer(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        poison.model = self.model

    poison = type("Holder", (), {})()
    Trainer.__init__ = keep_trainer
    try:
        with pytest.raises(NonFiniteLossError, match="Training stopped at epoch 2, batch 1: the training loss is nan"):
            run_experiment(tiny_cfg, callbacks=(poison_after_epoch_1,))
    finally:
        Trainer.__init__ = real_init
    assert seen == [1]
    (run_dir,) = Path(tiny_cfg["output_dir"]).iterdir()
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model_state"].values())


# -- full disks ---------------------------------------------------------------------------------------


def _fill_after_epoch(folder: Path, epoch: int = 1, leave: int = 0):
    def callback(e, row):
        if e == epoch:
            callback.filler = fill_disk(folder, leave)

    callback.filler = None
    return callback


def _assert_failed_everywhere(group, run_dir: Path, message: str) -> None:
    text = " ".join(message.split())
    assert "FAILED" in text and "No space left on device" in text and f"Not saved in {run_dir}" in text, text
    assert "no partial file was left" in text and "Kept:" in text
    mlflow_tracker, wandb_tracker = group.trackers
    run = mlflow.MlflowClient(mlflow_tracker.tracking_uri).get_run(mlflow_tracker.run_id)
    assert run.info.status == FAILED
    summary = json.loads(wandb_leet(wandb_tracker.run_dir, "--summary"))
    assert summary["exit_code"] == 1 and summary["summary"]["status"] == FAILED
    no_partial_files(run_dir)


@migrated_store
def test_outputs_on_a_full_file_system_end_failed_everywhere(tiny_cfg, tmp_path):
    from cxrtrack.tracking import build_tracker

    with small_filesystem(tmp_path / "small", "4m") as out:
        tiny_cfg["output_dir"] = str(out)
        group = build_tracker("both", tiny_cfg)
        with pytest.raises(RunFailedError) as err:
            run_experiment(tiny_cfg, tracker=group, callbacks=(_fill_after_epoch(out),))
        (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
        _assert_failed_everywhere(group, run_dir, str(err.value))
        assert err.value.exit_code == 1


@migrated_store
def test_injected_enospc_in_the_outputs_ends_failed_everywhere(tiny_cfg, monkeypatch):
    """The same path without a tmpfs: every atomic write after epoch 1 fails half-way with ENOSPC."""
    from cxrtrack.tracking import build_tracker

    state = {"full": False}

    def full_after_epoch_1(path, write):
        if not state["full"]:
            return atomic_write(path, write)

        def half_then_full(tmp):
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

        return atomic_write(path, half_then_full)

    monkeypatch.setattr(trainer_module, "atomic_write", full_after_epoch_1)
    monkeypatch.setattr(scaffold, "atomic_write", full_after_epoch_1)  # the run's files (RunFiles)
    group = build_tracker("both", tiny_cfg)
    with pytest.raises(RunFailedError) as err:
        run_experiment(tiny_cfg, tracker=group, callbacks=(lambda e, row: state.update(full=True),))
    (run_dir,) = Path(tiny_cfg["output_dir"]).iterdir()
    _assert_failed_everywhere(group, run_dir, str(err.value))
    assert not (run_dir / "history.json").exists()  # not written, rather than written half


@migrated_store
def test_a_full_disk_at_the_end_of_an_epoch_still_sends_that_epoch_to_the_trackers(tiny_cfg, tmp_path):
    """Issue 14: with outputs/ on a small tmpfs, last.pt failing at the end of an epoch kept that epoch from the
    trackers (MLflow had no point of it while history.json held it), and the message said "Not saved:
    checkpoints/best.pt". Here the disk fills after epoch 1 so that epoch 2's best.pt still fits and its last.pt
    (weights and optimizer state) does not: MLflow holds epoch 2 all the same, and the message names last.pt."""
    from cxrtrack.tracking import build_tracker

    with small_filesystem(tmp_path / "small", "8m") as out:
        tiny_cfg["output_dir"] = str(out)

        def fill_between_best_and_last(epoch, row):
            if epoch == 1:
                (folder,) = out.glob("*/checkpoints")
                best, last = (folder / "best.pt").stat().st_size, (folder / "last.pt").stat().st_size
                assert last > best + 2**16, (best, last)  # room for one and not for the other
                fill_disk(out, leave=best + (last - best) // 2)

        group = build_tracker("mlflow", tiny_cfg)
        with pytest.raises(RunFailedError) as err:
            run_experiment(tiny_cfg, tracker=group, callbacks=(fill_between_best_and_last,))
        (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
        text = " ".join(str(err.value).split())
        assert "(writing checkpoints/last.pt of epoch 2)" in text, text
        assert re.search(rf"Not saved in {re.escape(str(run_dir))}: checkpoints/last\.pt of epoch 2[;,]", text), text
        assert "best.pt of epoch" not in text, text  # best.pt was written: it is not named as lost
        kept = int(re.search(r"Kept: the best checkpoint of epoch (\d+)", text).group(1))
        assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"] == kept
        tracker = group.trackers[0]
        client = mlflow.MlflowClient(tracker.tracking_uri)
        assert client.get_run(tracker.run_id).info.status == FAILED
        steps = [m.step for m in client.get_metric_history(tracker.run_id, "val/acc")]
        assert sorted(steps) == [1, 2], steps  # the epoch whose last.pt failed reached MLflow
        history = json.loads((run_dir / "history.json").read_text())
        assert [row["epoch"] for row in history["epochs"]] == [1, 2]
        no_partial_files(run_dir)


def test_mlflow_store_on_a_full_file_system_is_spooled_then_replayed(tiny_cfg, tmp_path, caplog):
    with small_filesystem(tmp_path / "store", "16m") as store:
        tiny_cfg["tracking"]["tracker"] = "mlflow"
        tiny_cfg["tracking"]["mlflow"].update(tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
                                              artifact_location=str(store / "mlartifacts"), system_metrics=False)
        fill = _fill_after_epoch(store)
        with caplog.at_level(logging.INFO):
            result = run_experiment(tiny_cfg, callbacks=(fill,))
        assert result.status == FINISHED and not result.complete
        assert "not stored yet" in result.problems["MLflow"] and "make replay" in result.problems["MLflow"]
        final = [m for m in caplog.messages if m.startswith(f"Run {result.run_name} FINISHED")][-1]
        assert re.search(r"FINISHED with \d+ tracker errors \(MLflow: metrics of epochs 2-3, "
                         r".*the final status not stored yet", final), final
        tracker = result.tracker.trackers[0]
        uri = tracker.tracking_uri
        assert mlflow.MlflowClient(uri).get_run(tracker.run_id).info.status == "RUNNING"  # the disk took nothing
        pending = len(tracker.spool.pending())

        fill.filler.unlink()  # space again
        replayed = replay_spool(tracker.spool.root)
        assert replayed.complete and replayed.sent == pending > 0, replayed
        stored = read_mlflow(uri, tracker.run_id)
        sections = diff_records(result.record, stored, "mlflow")
        assert total_lost(sections) == 0, {k: (s.missing, s.mismatched) for k, s in sections.items()}
        assert stored.status == FINISHED
        assert replay_spool(tracker.spool.root).sent == 0  # a second replay adds nothing
        print(f"\n[figures] MLflow store on a full disk: {pending} calls spooled, {replayed.sent} replayed after space "
              f"was freed, 0 by the second replay")


@migrated_store
def test_wandb_folder_on_a_full_file_system_is_reported(tiny_cfg, tmp_path, caplog):
    with small_filesystem(tmp_path / "wb", "6m") as wb:
        tiny_cfg["tracking"]["tracker"] = "both"
        tiny_cfg["tracking"]["wandb"]["dir"] = str(wb)
        with caplog.at_level(logging.INFO):
            result = run_experiment(tiny_cfg, callbacks=(_fill_after_epoch(wb),))
        assert result.status == FINISHED and not result.complete
        assert "W&B did not store the end of the offline run" in result.problems["W&B"]
        assert "its writer failed: no space left on device" in result.problems["W&B"]
        assert "MLflow" not in result.problems  # the other tracker holds everything
        final = [m for m in caplog.messages if m.startswith(f"Run {result.run_name} FINISHED")][-1]
        assert re.search(r"FINISHED with \d+ tracker errors \(W&B: .*the final status not saved "
                         r".*its writer failed: no space left on device", final), final


def test_two_runs_in_the_same_second_never_share_a_folder(tiny_cfg):
    from cxrtrack.training.scaffold import claim_run_dir

    tiny_cfg["run_name"] = None
    names = [claim_run_dir(tiny_cfg)[0] for _ in range(3)]
    assert len(set(names)) == 3 and names[1] == f"{names[0]}-2" and names[2] == f"{names[0]}-3"
    tiny_cfg["run_name"] = "mine"
    assert [claim_run_dir(tiny_cfg)[0] for _ in range(2)] == ["mine", "mine-2"]


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    from cxrtrack.models import CustomCXRNet
    from cxrtrack.training.recipe import Recipe

    model = CustomCXRNet(image_size=64)
    with torch.no_grad():
        next(model.parameters())[0] = math.inf
    trainer = Trainer.__new__(Trainer)
    trainer.model, trainer.cfg, trainer.best_epoch = model, {"lr": 0.1, "grad_clip_norm": None}, None
    trainer.checkpoint_path, trainer.monitor, trainer.checkpoint_extra = tmp_path / "best.pt", "val/loss", {}
    trainer.recipe = Recipe()  # no EMA/SWA: the raw weights are what would be checkpointed
    trainer.recipe.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), 1, torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match="model weights"):
        trainer.save_checkpoint(1, 0.5, {})
    assert list(tmp_path.iterdir()) == []


def test_a_signal_inside_a_critical_step_waits_for_it_and_a_second_one_does_not(monkeypatch):
    """The end of an epoch (its row, checkpoint, tracker calls) or a tracker call is never cut in half; asking
    twice stops at once. Real signals, sent to this process."""
    from cxrtrack import signals

    with signals.sigterm_as_interrupt():
        done = []
        with pytest.raises(signals.Terminated):
            with signals.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("the step finished")
        assert done == ["the step finished"]

    with signals.sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            with signals.critical():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGINT)  # asked again: no waiting
                time.sleep(0.05)
                pytest.fail("the second signal should have stopped the step")
    assert signal.getsignal(signal.SIGTERM) is not signals._handler  # handlers restored


def test_one_signal_handler_a_block_inside_another_changes_nothing():
    """The scripts (cli.run_main), the compare and a tuning session each ask for the handler: an inner block keeps
    the outer one's handler and state (a process already stopping stays so: a second SIGTERM while it closes its
    runs does not cut that short), and the outer one restores what was there before."""
    from cxrtrack import signals

    before = signal.getsignal(signal.SIGTERM)
    with signals.sigterm_as_interrupt():
        with pytest.raises(signals.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        with signals.sigterm_as_interrupt():  # e.g. a tuning session's block, entered while the process stops
            assert signals.received() == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # asked again while closing: logged, not raised
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) is signals._handler
    assert signal.getsignal(signal.SIGTERM) is before
    # and the signal that stopped the block is not remembered after it: a later run in this process (the tests run
    # many) that ends by Ctrl-C must not report the old SIGTERM (143 instead of 130)
    assert signals.received() is None and signals.exit_status() == 130


@migrated_store
def test_a_locked_sqlite_store_costs_one_stall_and_loses_no_epoch(tiny_cfg, tmp_path):
    """Another process holds the SQLite store locked (BEGIN EXCLUSIVE) for longer than MLflow's own 20 s busy
    timeout: that epoch's metrics go to the spool instead of being dropped, later probes see the lock in 0.5 s,
    and everything is sent once the lock is released."""
    tiny_cfg["tracking"]["tracker"] = "mlflow"
    tiny_cfg["tracking"]["mlflow"].update(reconnect_interval=0, system_metrics=False)
    tiny_cfg["training"]["epochs"] = 5
    db = Path(tiny_cfg["tracking"]["mlflow"]["tracking_uri"].removeprefix("sqlite:///"))
    holder = {}

    def lock(epoch, row):
        if epoch == 1:
            code = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], timeout=60); "
                    "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(float(sys.argv[2])); "
                    "c.rollback()")
            holder["proc"] = subprocess.Popen([sys.executable, "-c", code, str(db), "24"],
                                              stdout=subprocess.PIPE, text=True)
            assert holder["proc"].stdout.readline().strip() == "locked"
        if epoch == 3:
            holder["proc"].wait(120)  # released before the end of the run

    result = run_experiment(tiny_cfg, callbacks=(lock,))
    tracker = result.tracker.trackers[0]
    assert result.status == FINISHED and result.complete, result.problems
    assert tracker.spooled > 0 and tracker.replayed == tracker.spooled
    stored = read_mlflow(tracker.tracking_uri, tracker.run_id)
    sections = diff_records(result.record, stored, "mlflow")
    assert total_lost(sections) == 0, {k: (s.missing, s.mismatched) for k, s in sections.items() if s.lost}
    times = sorted(result.tracker.call_times["mlflow"]["log_metrics"])
    print(f"\n[figures] locked SQLite: failed call {times[-1]:.1f} s (MLflow's busy timeout), other calls median "
          f"{times[len(times) // 2] * 1000:.0f} ms; {tracker.spooled} spooled, {tracker.replayed} replayed")
