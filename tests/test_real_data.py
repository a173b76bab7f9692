"""Cross-validation on the real chest X-rays (a small stratified subset of the official train split), read back.

The real train split lives beside the project (../shared/data/covid19-real-train, or CXRTRACK_REAL_DATA); these
tests skip, saying so, where it is absent. The subset is 10 images per class, 2 folds, 2 epochs: a smoke run of the
protocol that chooses the default recipe (docs/model-quality.md), not a measurement of quality.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from cxrtrack.tracking.readback import read_mlflow, read_wandb
from tests.conftest import ROOT

REAL = Path(os.environ.get("CXRTRACK_REAL_DATA", ROOT.parent / "shared" / "data" / "covid19-real-train"))
CLASSES = ("Covid", "Normal", "Viral Pneumonia")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REAL / "train").is_dir(),
                       reason=f"the real train split is not at {REAL} (set CXRTRACK_REAL_DATA to its folder)"),
]


@pytest.fixture(scope="module")
def real_cv(tmp_path_factory):
    """`scripts/train.py --folds 2 --threads 1 --tracker both` on 30 real images: (completed process, tmp)."""
    tmp = tmp_path_factory.mktemp("real")
    for name in CLASSES:  # 10 per class, the first in name order: a fixed, stratified subset
        dest = tmp / "subset" / "train" / name
        dest.mkdir(parents=True)
        for path in sorted((REAL / "train" / name).iterdir())[:10]:
            shutil.copy(path, dest / path.name)
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "offline"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "train.yaml"),
         "--tracker", "both", "--data", str(tmp / "subset"), "--folds", "2", "--epochs", "2", "--threads", "1",
         "--run-name", "real-cv", "--set", "data.test_fraction=0", "--set", f"output_dir={tmp / 'outputs'}",
         "--set", f"tracking.mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
         "--set", f"tracking.mlflow.artifact_location={tmp / 'mlartifacts'}", "--set", f"tracking.wandb.dir={tmp}",
         "--set", "tracking.mlflow.system_metrics=false"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp


def _mlflow_runs(tmp: Path):
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("job_type") == "cv")
    folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return uri, parent, sorted(folds, key=lambda r: r.data.tags["fold"])


def test_the_cv_parent_and_its_folds_are_stored_with_per_class_recall_and_out_of_fold_metrics(real_cv):
    proc, tmp = real_cv
    uri, parent, folds = _mlflow_runs(tmp)
    assert parent.info.status == "FINISHED" and [f.data.tags["fold"] for f in folds] == ["1", "2"]
    assert all(f.info.status == "FINISHED" for f in folds)
    assert parent.data.params["dataset.n_train_pool"] == "30" and parent.data.params["dataset.test_split"] == "none"
    for key in ("val/acc", "val/f1_macro", "val/recall_covid19", "val/recall_normal", "val/recall_viral_pneumonia"):
        values = [f.data.metrics[f"best_{key}"] for f in folds]  # what each fold's store holds
        assert parent.data.metrics[f"cv/{key}_mean"] == pytest.approx(np.mean(values), rel=1e-6)
        assert parent.data.metrics[f"cv/{key}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-6, abs=1e-9)
    # the pooled out-of-fold figures agree with the stored per-image predictions and with the folds' own accuracy
    record = read_mlflow(uri, parent.info.run_id)
    oof = pd.read_csv(tmp / "outputs" / "real-cv" / "oof_predictions.csv")
    assert "cv/oof_predictions.csv" in record.artifacts and len(oof) == 30 and oof["path"].is_unique
    assert sorted(oof["label"].value_counts().tolist()) == [10, 10, 10]
    assert parent.data.metrics["cv/oof/acc"] == pytest.approx((oof["label"] == oof["predicted"]).mean())
    n = [int(f.data.params["dataset.n_val"]) for f in folds]
    weighted = sum(f.data.metrics["best_val/acc"] * k for f, k in zip(folds, n, strict=True)) / sum(n)
    assert parent.data.metrics["cv/oof/acc"] == pytest.approx(weighted, rel=1e-6)
    covid = oof[oof["label"] == "COVID-19"]
    assert parent.data.metrics["cv/oof/recall_covid19"] == pytest.approx((covid["predicted"] == "COVID-19").mean())
    assert "test/acc" not in parent.data.metrics  # no test split: nothing tested, nothing registered
    assert not mlflow.MlflowClient(tracking_uri=uri).search_model_versions(f"run_id='{parent.info.run_id}'")


def test_the_thread_setting_reaches_torch_and_both_trackers(real_cv):
    proc, tmp = real_cv
    _, parent, folds = _mlflow_runs(tmp)
    for run in (parent, *folds):
        assert run.data.params["threads"] == "1"
        assert run.data.params["resolved.threads"] == "1"  # torch.get_num_threads() in the training process
    wandb_dirs = sorted((tmp / "wandb").glob("offline-run-*"))
    assert len(wandb_dirs) == 3  # the parent and two folds
    for run_dir in wandb_dirs:
        params = read_wandb(run_dir).params
        assert params["threads"] in (1, "1") and params["resolved.threads"] in (1, "1")
