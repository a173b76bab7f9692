"""Train end to end through the W&B tracker (offline: no API key), then read the run back with
``wandb leet inspect --json`` and compare it with what the trainer computed."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from cxrtrack.config import flatten
from cxrtrack.tracking.wandb_tracker import resolve_mode
from cxrtrack.training.run import run_experiment
from tests.conftest import CONFIGS, wandb_leet

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-kaggle-key-9876543210"


def leet(run_dir: Path, *flags: str) -> str:
    return wandb_leet(run_dir, *flags)


@pytest.fixture(scope="module")
def wandb_read(tmp_path_factory, tiny_data_root):
    """One tracked run shared by the read-back tests below, and what `wandb leet inspect` reads back from it:
    (result, tracker, records, summary, the records' text)."""
    from cxrtrack.config import load_config

    tmp = tmp_path_factory.mktemp("wandb-run")
    cfg = load_config(CONFIGS / "quick.yaml", values={
        "data.path": str(tiny_data_root), "data.image_size": 64, "data.batch_size": 16,
        "training.epochs": 3, "evaluation.n_prediction_images": 6, "output_dir": str(tmp / "outputs"),
        "tracking.tracker": "wandb", "tracking.wandb.dir": str(tmp), "tracking.wandb.system_metrics_interval": 1,
        "tracking.tags": {"note": f"key={SECRET}"},
    })
    os.environ["KAGGLE_KEY"] = SECRET  # a secret in the environment must never reach the tracker
    started = time.monotonic()

    def last_long_enough(epoch, row):
        # W&B's CPU % needs two system-metric samples (1 s apart here): a tiny run on a fast machine can end before
        # the second, so the last epoch waits until the run has lasted 3 s (test_system_metrics_are_recorded)
        if epoch == cfg["training"]["epochs"]:
            time.sleep(max(0.0, 3.0 - (time.monotonic() - started)))

    try:
        result = run_experiment(cfg, callbacks=(last_long_enough,))
    finally:
        del os.environ["KAGGLE_KEY"]
    tracker = result.tracker.trackers[0]
    text = leet(tracker.run_dir)  # every record of the run, read once: the tests below only look at it
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    summary = json.loads(leet(tracker.run_dir, "--summary"))
    return result, tracker, records, summary, text


@pytest.fixture(scope="module")
def wandb_run(wandb_read):
    """(result, tracker, the run's records as read back, its summary)."""
    return wandb_read[:4]


def test_offline_automatically_without_an_api_key(wandb_run):
    _, tracker, _, summary = wandb_run
    assert tracker.mode == "offline"
    assert tracker.run_dir.name.startswith("offline-run-")
    assert summary["state"] == "finished" and summary["exit_code"] == 0


def test_config_holds_every_param(wandb_run):
    result, _, _, summary = wandb_run
    stored = flatten(summary["config"])
    for key, value in result.params.items():
        if value == {}:
            assert key not in stored  # W&B drops empty sections (tracking.tags: {})
            continue
        assert key in stored, key
        assert stored[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert summary["name"] == result.run_name


def test_every_epoch_is_a_history_row_with_epoch_as_step(wandb_run):
    result, _, records, _ = wandb_run
    metric_defs = [r["metric"] for r in records if r["type"] == "metric"]
    stepped = {m["name"] for m in metric_defs if m.get("step_metric") == "epoch"}
    assert stepped == set(result.record.metrics)  # the epoch axis for every metric key, and only for those
    rows = [r["history"]["item"] for r in records if r["type"] == "history" and "train/loss" in r["history"]["item"]]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for stored, computed in zip(rows, result.fit.history, strict=True):
        for key, value in computed.items():
            assert stored[key] == pytest.approx(value, rel=1e-6), key


def test_summary_has_best_and_test_metrics(wandb_run):
    result, _, _, summary = wandb_run
    flat = flatten(summary["summary"], sep="/")  # leet nests the summary by "/"
    assert flat["best_epoch"] == result.fit.best_epoch
    for key, value in result.test.tracked_metrics().items():
        if not math.isnan(value):
            assert flat[key] == pytest.approx(value, rel=1e-6), key
    assert flat["status"] == "FINISHED"


def test_predictions_table_images_and_confusion_chart(wandb_run):
    result, _, records, _ = wandb_run
    history = {}
    for r in records:
        if r["type"] == "history":
            history.update(r["history"]["item"])
    n_test = len(result.test.predictions.y_true)
    assert history["test/predictions._type"] == "table-file"
    assert history["test/predictions.nrows"] == n_test
    assert history["test/prediction_images._type"] == "images/separated"
    captions = history["test/prediction_images.captions"]
    assert len(captions) == 6 and captions[0] == result.test.predictions.caption(0)
    assert history["test/confusion_matrix_table._type"] == "table-file"
    for name in ("training_curves", "confusion_matrix", "roc_curves", "test_predictions"):
        assert history[f"plots/{name}._type"] == "image-file"


def test_model_and_run_files_are_versioned_artifacts(wandb_run):
    result, _, records, _ = wandb_run
    artifacts = {r["artifact"]["name"]: r["artifact"] for r in records if r["type"] == "artifact"}
    model = artifacts["customcxrnet"]
    assert model["type"] == "model"
    assert {"best", "latest", f"epoch-{result.fit.best_epoch}"} <= set(model["aliases"])
    assert [c["path"] for c in model["manifest"]["contents"]] == ["best.pt"]
    assert json.loads(model["metadata"])["dataset_fingerprint"] == result.params["dataset.fingerprint"]
    files = next(a for name, a in artifacts.items() if name.startswith("run-files-"))
    assert {c["path"] for c in files["manifest"]["contents"]} == {
        "checkpoints/best.pt", "config.yaml", "history.json", "reports/classification_report.txt",
        "reports/test_metrics.json", "reports/test_predictions.csv",
    }


def test_system_metrics_are_recorded(wandb_run):
    _, _, records, _ = wandb_run
    stats = [r["stats"]["item"] for r in records if r["type"] == "stats"]
    assert stats, "no system-metric samples in the run"
    assert all("memory_percent" in sample for sample in stats)
    assert any("cpu" in sample for sample in stats)  # CPU % needs two readings: absent from the first sample


def test_no_secret_reaches_the_tracker(wandb_read):
    _, _, _, summary, everything = wandb_read  # every record of the run: config, history, summary, artifacts
    assert SECRET not in everything
    assert summary["config"]["run_tags"]["note"] == "***REDACTED***"


@pytest.fixture
def fresh_wandb():
    """W&B caches its settings (key, server URL) in a process-wide singleton: reset it after tests that
    change the environment, or later runs in this process would still see a fake key and server."""
    yield
    import wandb

    wandb.teardown()


def test_mode_resolution(monkeypatch, tmp_path, fresh_wandb):
    assert resolve_mode("auto") == "offline"  # conftest: no key, empty netrc
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"  # the environment wins


def test_a_wandb_login_netrc_means_online(monkeypatch, tmp_path, fresh_wandb):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'p' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "online"


def test_auto_mode_falls_back_to_offline_when_the_server_is_unreachable(tiny_cfg, monkeypatch, caplog, fresh_wandb):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # a key, so auto mode tries online...
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # ...against a server that refuses connections
    tiny_cfg["tracking"]["tracker"] = "wandb"
    tiny_cfg["tracking"]["wandb"]["init_timeout"] = 3
    tiny_cfg["training"]["epochs"] = 1
    result = run_experiment(tiny_cfg)
    tracker = result.tracker.trackers[0]
    assert result.status == "FINISHED" and tracker.mode == "offline"
    assert "could not reach the server" in caplog.text
    assert json.loads(leet(tracker.run_dir, "--summary"))["state"] == "finished"
