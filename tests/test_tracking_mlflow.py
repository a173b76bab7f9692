"""Train end to end through the MLflow tracker, then read back what the SQLite store holds."""

from __future__ import annotations

import json
import math
from unittest import mock

import numpy as np
import pytest
import torch

from cxrtrack.provenance import REDACTED
from cxrtrack.training.run import run_experiment

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-kaggle-key-0123456789"

EXPECTED_ARTIFACTS = {
    "checkpoints/best.pt",
    "config.yaml",
    "history.json",
    "reports/classification_report.txt",
    "reports/test_metrics.json",
    "reports/test_predictions.csv",
    "plots/training_curves.png",
    "plots/confusion_matrix.png",
    "plots/roc_curves.png",
    "plots/test_predictions.png",
    "samples/train_batch_augmented.png",
    "test/predictions.json",
}


def list_artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= list_artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, tiny_data_root, empty_mlflow_store):
    """One tracked run shared by the read-back tests below (training takes a few seconds)."""
    import os

    from cxrtrack.config import load_config
    from tests.conftest import CONFIGS

    tmp = tmp_path_factory.mktemp("mlflow-run")
    os.environ["KAGGLE_KEY"] = SECRET  # a secret in the environment must never reach the tracker
    try:
        cfg = load_config(CONFIGS / "quick.yaml", values={
            "data.path": str(tiny_data_root), "data.image_size": 64, "data.batch_size": 16,
            "training.epochs": 3, "evaluation.n_prediction_images": 6, "output_dir": str(tmp / "outputs"),
            "tracking.tracker": "mlflow", "tracking.mlflow.tracking_uri": empty_mlflow_store(tmp / "mlflow.db"),
            "tracking.mlflow.artifact_location": str(tmp / "mlartifacts"),
            "tracking.mlflow.system_metrics_interval": 1,
            "tracking.tags": {"note": f"key={SECRET}", "team": "radiology"}, "tracking.register": True,
            "tracking.mlflow.model_format": "pt2",  # the default's format (the quick config's pickle: test below)
        })
        result = run_experiment(cfg)
    finally:
        del os.environ["KAGGLE_KEY"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["mlflow"]["tracking_uri"])
    tracker = result.tracker.trackers[0]
    return result, client, client.get_run(tracker.run_id), tracker


def test_run_finished_with_readable_name(mlflow_run):
    result, _, run, _ = mlflow_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == result.run_name
    assert result.run_name.startswith("quick-64px-3ep-")


def test_params_are_the_flattened_config_plus_derived_values(mlflow_run):
    result, _, run, _ = mlflow_run
    expected = {k: "None" if v is None else str(v) for k, v in result.params.items()}
    assert run.data.params == expected
    assert run.data.params["training.lr"] == "0.001"
    assert run.data.params["data.image_size"] == "64"
    assert run.data.params["dataset.source"] == "synthetic"
    assert int(run.data.params["model.num_parameters"]) == sum(
        p.numel() for p in torch.load(result.fit.checkpoint, weights_only=True)["model_state"].values()
    )


def test_every_epoch_metric_matches_the_trainer_history(mlflow_run):
    result, client, run, _ = mlflow_run
    history = result.fit.history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for key in history[0]:
        if key == "epoch":
            continue
        stored = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in stored] == [1, 2, 3], key
        assert [v for _, v in stored] == pytest.approx([row[key] for row in history], rel=1e-6), key


def test_final_test_and_best_metrics_are_stored(mlflow_run):
    result, _, run, _ = mlflow_run
    for key, value in result.test.tracked_metrics().items():
        if math.isnan(value):
            assert key not in run.data.metrics
        else:
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-6), key
    assert run.data.metrics["best_epoch"] == result.fit.best_epoch
    best_row = result.fit.history[result.fit.best_epoch - 1]
    assert run.data.metrics["best_val/loss"] == pytest.approx(best_row["val/loss"])
    # The test metrics are those of the best checkpoint, recomputed here from the stored predictions.
    preds = result.test.predictions
    assert run.data.metrics["test/acc"] == pytest.approx(float(np.mean(preds.y_true == preds.y_pred)))


def test_artifacts_and_their_content(mlflow_run, tmp_path):
    result, client, run, _ = mlflow_run
    assert list_artifacts(client, run.info.run_id) >= EXPECTED_ARTIFACTS
    history = json.loads(open(client.download_artifacts(run.info.run_id, "history.json", str(tmp_path))).read())
    assert len(history["epochs"]) == len(result.fit.history)
    for stored, computed in zip(history["epochs"], result.fit.history, strict=True):
        assert stored == pytest.approx(computed)
    assert history["best_epoch"] == result.fit.best_epoch
    ckpt = torch.load(client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path)),
                      weights_only=True)
    assert ckpt["epoch"] == result.fit.best_epoch


def test_tags_record_code_data_and_environment(mlflow_run):
    result, _, run, _ = mlflow_run
    tags = run.data.tags
    assert tags["dataset_source"] == "synthetic"
    assert tags["dataset_fingerprint"] == result.params["dataset.fingerprint"]
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert tags["git_dirty"] in ("true", "false", "unknown")
    assert tags["torch_version"] == torch.__version__
    assert tags["device"] == "cpu"
    assert tags["team"] == "radiology"


def test_no_secret_reaches_the_tracker(mlflow_run, tmp_path):
    _, client, run, _ = mlflow_run
    everything = json.dumps([run.data.params, run.data.tags])
    everything += open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read()
    assert SECRET not in everything
    assert run.data.tags["note"] == REDACTED


def test_system_metrics_are_recorded(mlflow_run):
    _, _, run, _ = mlflow_run
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)


def test_model_is_registered_and_predicts_like_the_trained_model(mlflow_run):
    result, client, run, _ = mlflow_run
    import mlflow.pyfunc

    versions = client.search_model_versions("name='CustomCXRNet'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    loaded = mlflow.pyfunc.load_model(f"models:/CustomCXRNet/{versions[0].version}")
    from cxrtrack.training.evaluate import load_checkpoint

    model, _ = load_checkpoint(result.fit.checkpoint)
    batch = np.random.default_rng(0).normal(size=(5, 1, 64, 64)).astype(np.float32)  # any batch size works
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(np.asarray(loaded.predict(batch)), expected, rtol=1e-4, atol=1e-5)


def test_evaluate_a_tracked_run_by_its_id(mlflow_run, tmp_path):
    """`make evaluate RUN_ID=...`: fetch the run's checkpoint from the store and re-evaluate it."""
    from cxrtrack.tracking.mlflow_store import download_checkpoint
    from cxrtrack.training.evaluate import evaluate_checkpoint

    result, client, run, tracker = mlflow_run
    checkpoint = download_checkpoint(run.info.run_id, tracker.tracking_uri, tmp_path / "dl")
    report, out = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "eval")
    assert report.metrics["acc"] == pytest.approx(run.data.metrics["test/acc"])
    assert report.loss == pytest.approx(run.data.metrics["test/loss"], rel=1e-5)
    assert (out / "classification_report.txt").is_file()


def test_unknown_run_id_is_a_clear_error(mlflow_run):
    from cxrtrack.errors import CXRError
    from cxrtrack.tracking.mlflow_store import download_checkpoint

    _, _, _, tracker = mlflow_run
    with pytest.raises(CXRError, match="Could not fetch checkpoints/best.pt of MLflow run 0123abc"):
        download_checkpoint("0123abc", tracker.tracking_uri)


def test_quick_config_model_format_loads_back_and_predicts_like_the_trainer(tiny_cfg, tmp_path, empty_mlflow_store):
    """configs/quick.yaml logs the cheaper pickle format (no torch.export): the logged model still loads back from
    MLflow, as the PyTorch flavor and as pyfunc, and predicts exactly what the trainer's best checkpoint does."""
    import mlflow.pyfunc
    import mlflow.pytorch

    from cxrtrack.config import load_config
    from cxrtrack.training.evaluate import load_checkpoint
    from tests.conftest import CONFIGS

    assert load_config(CONFIGS / "quick.yaml")["tracking"]["mlflow"]["model_format"] == "pickle"
    assert load_config(CONFIGS / "default.yaml")["tracking"]["mlflow"]["model_format"] == "pt2"
    cfg = tiny_cfg
    assert cfg["tracking"]["mlflow"]["model_format"] == "pickle"
    cfg["tracking"]["tracker"] = "mlflow"
    cfg["training"]["epochs"] = 2
    assert cfg["tracking"]["mlflow"]["tracking_uri"] == empty_mlflow_store(tmp_path / "mlflow.db")
    from mlflow.utils import requirements_utils

    # MLflow's requirement check (a scan of every installed distribution) is skipped both where log_model saves the
    # model and where it loads it back to validate the input example (docs/speed.md)
    with mock.patch.object(requirements_utils, "_check_requirement_satisfied") as check:
        result = run_experiment(cfg)
    assert check.call_count == 0
    tracker = result.tracker.trackers[0]
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    files = list_artifacts(client, tracker.run_id, "model")
    assert "model/data/model.pth" in files and not any(f.endswith(".pt2") for f in files)

    model, _ = load_checkpoint(result.fit.checkpoint)
    batch = np.random.default_rng(1).normal(size=(3, 1, 64, 64)).astype(np.float32)  # any batch size works
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    pyfunc = mlflow.pyfunc.load_model(tracker.model_uri)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(batch)), expected, rtol=1e-5, atol=1e-6)
    module = mlflow.pytorch.load_model(tracker.model_uri)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(batch)).numpy(), expected, rtol=1e-5, atol=1e-6)
