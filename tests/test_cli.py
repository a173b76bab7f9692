"""The entry points as a user runs them: clean errors with exit status 2, and working runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from cxrtrack.data import download
from cxrtrack.errors import DataError
from tests.conftest import CONFIGS, ROOT, assert_clean_error, run_script


def test_missing_data_folder(tmp_path):
    proc = run_script("train.py", "--config", str(CONFIGS / "quick.yaml"), "--data", str(tmp_path / "nowhere"),
                      "--tracker", "none")
    assert_clean_error(proc, "does not exist", "make download", "synthetic")


def test_folder_without_a_dataset(tmp_path):
    (tmp_path / "holiday-photos").mkdir()
    proc = run_script("train.py", "--config", str(CONFIGS / "quick.yaml"), "--data", str(tmp_path), "--tracker", "none")
    assert_clean_error(proc, "No chest X-ray dataset found", "train/ and test/")


def test_unknown_tracker(tmp_path):
    proc = run_script("train.py", "--config", str(CONFIGS / "quick.yaml"), "--tracker", "tensorboard",
                      "--data", str(tmp_path / "unused"), "--set", f"output_dir={tmp_path}/outputs")
    assert_clean_error(proc, "Unknown tracker 'tensorboard'", "mlflow, wandb, both or none")
    assert not (tmp_path / "outputs").exists()  # failed before any work


def test_typo_in_a_setting():
    proc = run_script("train.py", "--config", str(CONFIGS / "quick.yaml"), "--set", "training.optimiser=sgd")
    assert_clean_error(proc, "Unknown setting 'training.optimiser'", "Did you mean 'training.optimizer'")


def test_bad_epochs_value():
    proc = run_script("train.py", "--config", str(CONFIGS / "quick.yaml"), "--epochs", "ten")
    assert proc.returncode == 2 and "invalid int value: 'ten'" in proc.stderr


def test_missing_config():
    proc = run_script("train.py", "--config", "configs/nope.yaml")
    assert_clean_error(proc, "nope.yaml does not exist")


def test_evaluate_needs_a_target_and_a_real_checkpoint(tmp_path):
    assert_clean_error(run_script("evaluate.py"), "CHECKPOINT=", "RUN_ID=")
    assert_clean_error(run_script("evaluate.py", "--checkpoint", str(tmp_path / "best.pt")), "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert_clean_error(run_script("evaluate.py", "--checkpoint", str(junk)), "not a CustomCXRNet checkpoint")


def test_download_offline_fails_fast_with_one_clear_paragraph(tmp_path, monkeypatch):
    def kagglehub_must_not_hang(*args, **kwargs):
        raise AssertionError("kagglehub was called although the network is known to be down")

    import kagglehub

    monkeypatch.setattr(kagglehub, "dataset_download", kagglehub_must_not_hang)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        download.download_dataset("pranavraikokte/covid19-image-dataset", tmp_path / "kaggle",
                                  check_network=lambda: False)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message
    for fragment in ("no network", "make download", "DATA=", "synthetic"):
        assert fragment in message


def test_download_versioned_handle_offline_uses_kagglehub_cache(tmp_path, monkeypatch, tiny_data_root):
    import kagglehub

    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, **kw: str(tiny_data_root))
    location = download.download_dataset("owner/data/versions/2", tmp_path / "kaggle", check_network=lambda: False)
    # copied into the project's data folder, where the training targets look
    assert location.root == tmp_path / "kaggle" / "Covid19-dataset"
    assert location.test_dir is not None and any(location.test_dir.rglob("*.jp*g"))


def test_download_finds_existing_data_without_network(tmp_path, monkeypatch, tiny_data_root):
    import shutil

    import kagglehub

    monkeypatch.setattr(kagglehub, "dataset_download", lambda *a, **k: pytest.fail("network used"))
    target = tmp_path / "kaggle"
    shutil.copytree(tiny_data_root / "Covid19-dataset", target / "Covid19-dataset")
    location = download.download_dataset("any/handle", target, check_network=lambda: pytest.fail("network checked"))
    assert location.test_dir == target / "Covid19-dataset" / "test"


def test_download_script_offline_exit_code(tmp_path):
    # A dead proxy guarantees "no network" even on a machine that has it.
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "KAGGLEHUB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "download.py"), "--dest", str(tmp_path / "kaggle")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert_clean_error(proc, "Could not download the Kaggle dataset 'pranavraikokte/covid19-image-dataset/versions/2'",
                       "make download")
    assert not (tmp_path / "kaggle").exists() or not any((tmp_path / "kaggle").iterdir())


@pytest.mark.slow
def test_train_then_evaluate_from_the_command_line(tmp_path, tiny_data_root):
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_root, data)
    out = tmp_path / "outputs"
    proc = run_script("train.py", "--config", str(CONFIGS / "quick.yaml"), "--data", str(data),
                      "--tracker", "none", "--epochs", "2", "--run-name", "cli-run", "--set", f"output_dir={out}",
                      "--set", "data.batch_size=16", "--set", "training.class_weights=balanced", subprocess_=True)
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC DATA" in proc.stderr
    run_dir = out / "cli-run"
    for name in ("checkpoints/best.pt", "history.json", "config.yaml", "test_metrics.json",
                 "classification_report.txt", "timings.json", "plots/training_curves.png", "plots/confusion_matrix.png",
                 "plots/roc_curves.png", "plots/test_predictions.png"):
        assert (run_dir / name).is_file(), name

    # Without --data: the data recorded in the checkpoint; the loss is weighted as in training.
    checkpoint = str(run_dir / "checkpoints" / "best.pt")
    proc = run_script("evaluate.py", "--checkpoint", checkpoint, "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((run_dir / "test_metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"])
    assert evaluated["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-5)
    assert "macro avg" in proc.stdout

    # The training data changed since: refuse to report numbers for other data unless asked to.
    victim = next((data / "Covid19-dataset" / "test" / "Normal").iterdir())
    victim.write_bytes(victim.read_bytes() + b"changed")
    assert_clean_error(run_script("evaluate.py", "--checkpoint", checkpoint), "training data has changed", "DATA=")
    proc = run_script("evaluate.py", "--checkpoint", checkpoint, "--data", str(data), "--out", str(tmp_path / "eval2"))
    assert proc.returncode == 0, proc.stderr


def test_make_help_lists_the_targets():
    proc = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    listed = {line.split()[0] for line in re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout).splitlines()
              if line.startswith("  ")}
    for target in ("install", "download", "mlflow-quick", "wandb-quick", "mlflow-train", "wandb-train", "train-custom",
                   "mlflow-ui", "wandb-sync", "evaluate", "replay", "test", "lint", "clean"):
        assert target in listed, target


COMMANDS = {"train": "--resume RUN", "evaluate": "--checkpoint", "tune": "--space", "compare": "--repeats",
            "replay": "--outputs", "download": "--handle", "mlflow-ui": "--port"}


def test_the_console_command_works_from_the_package_alone(tmp_path):
    """`cxrtrack <command>` from an installed package (a wheel: no scripts/ folder beside it), here the package
    copied on its own; `--help` and a config error never import torch."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "src" / "cxrtrack", site / "cxrtrack", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cxrtrack(*args):
        return subprocess.run([sys.executable, "-X", "importtime", "-m", "cxrtrack", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    assert str(site / "cxrtrack") in subprocess.run(  # the copy answers, not the checkout
        [sys.executable, "-c", "import cxrtrack.console as c; print(c.__file__)"], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60).stdout
    for command, flag in COMMANDS.items():
        proc = cxrtrack(command, "--help")
        assert proc.returncode == 0 and flag in proc.stdout, (command, proc.stderr[-2000:])
        assert "torch" not in re.findall(r"\|\s+(\S+)$", proc.stderr, flags=re.M), command
    proc = cxrtrack("train", "--config", "missing.yaml")
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr
    assert "torch" not in re.findall(r"\|\s+(\S+)$", proc.stderr, flags=re.M)
    proc = cxrtrack("trian")
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_mlflow_ui_links_the_latest_top_level_run_not_a_nested_trial(tmp_path, empty_mlflow_store):
    """After a tuning study (or a CV) the newest run is a nested trial or fold; `make mlflow-ui` prints the page of the
    newest run that has no parent: the study's or the CV's parent."""
    import mlflow

    from cxrtrack.cli.mlflow_ui import latest_run

    uri = empty_mlflow_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, run_name="study")
    for i in range(3):
        time.sleep(0.01)  # start times in milliseconds: each child starts after the parent
        client.create_run(exp, run_name=f"trial-{i}", tags={"mlflow.parentRunId": parent.info.run_id})
    assert latest_run(uri) == (exp, parent.info.run_id, "study")
