"""Cross-validation, its final models and seed studies end to end on tiny data, read back from the stores."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from cxrtrack.config import load_config
from cxrtrack.data import dataset as dataset_module
from cxrtrack.data.dataset import build_data
from cxrtrack.models import CustomCXRNet
from cxrtrack.selection.cv import run_cv
from cxrtrack.selection.seeds import run_seeds
from cxrtrack.tracking.readback import RunRecord, diff_records, read_mlflow, read_wandb, total_lost
from cxrtrack.training import trainer as trainer_module
from cxrtrack.training.evaluate import evaluate_checkpoint, load_checkpoint
from tests.conftest import CONFIGS

pytestmark = pytest.mark.slow

# Every recipe switch away from its default, so that each one's tracked param is checked against its value.
SWITCHES = {
    "data.equalize": "clahe", "data.clahe_clip_limit": 3.0, "data.clahe_grid": 4,
    "data.augment.resized_crop": True, "data.augment.crop_scale": [0.8, 1.0], "data.augment.crop_ratio": [0.95, 1.05],
    "data.augment.shear": 3.0, "data.augment.mixup_alpha": 0.2, "data.augment.cutmix_alpha": 0.5,
    "training.label_smoothing": 0.1, "training.weight_averaging": "ema", "training.ema_decay": 0.9,
    "training.swa_start": 0.5, "training.swa_lr": 0.0003, "training.optimizer": "adamw", "training.weight_decay": 0.01,
    "training.scheduler": "cosine", "training.warmup_epochs": 1, "training.channels_last": True,
    "training.precision": "bf16", "training.cv_folds": 2, "training.cv_final": "ensemble", "evaluation.tta": "hflip",
}


def cfg_for(tmp: Path, data_root: Path, tracker: str, **values):
    return load_config(CONFIGS / "quick.yaml", values={
        "data.path": str(data_root), "data.image_size": 64, "data.batch_size": 16, "training.epochs": 2,
        "data.augment.enabled": True,  # the quick config turns it off; the recipe switches (MixUp, ...) need it
        "training.early_stopping_patience": 0, "evaluation.n_prediction_images": 6, "output_dir": str(tmp / "outputs"),
        "tracking.tracker": tracker, "tracking.mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "tracking.mlflow.artifact_location": str(tmp / "mlartifacts"), "tracking.mlflow.system_metrics": False,
        "tracking.wandb.dir": str(tmp), "tracking.wandb.system_metrics_interval": 1, **values})


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, tiny_data_root, empty_mlflow_store):
    """A 2-fold cross-validation with every switch on, tracked in MLflow and W&B, with the test split and the
    end of every training instrumented: (result, cfg, events)."""
    tmp = tmp_path_factory.mktemp("cv")
    empty_mlflow_store(tmp / "mlflow.db")  # cfg_for's store, new and empty (MLflow's migrations run once a session)
    cfg = cfg_for(tmp, tiny_data_root, "both", **SWITCHES)
    events: list[str] = []
    mp = pytest.MonkeyPatch()
    getitem, fit = dataset_module.CXRDataset.__getitem__, trainer_module.Trainer.fit

    def spy_getitem(self, index):
        events.append(f"read {self.split.paths[index].parent.parent.name}")
        return getitem(self, index)

    def spy_fit(self):
        out = fit(self)
        events.append("fit end")
        return out

    mp.setattr(dataset_module.CXRDataset, "__getitem__", spy_getitem)
    mp.setattr(trainer_module.Trainer, "fit", spy_fit)
    try:
        result = run_cv(cfg)
    finally:
        mp.undo()
    return result, cfg, events


@pytest.fixture(scope="module")
def wandb_read(cv_run):
    """The W&B runs of the cross-validation (the parent and each fold), each read back once with read_wandb and
    shared by the tests that only look at them: {run folder: RunRecord}."""
    cache: dict[str, RunRecord] = {}

    def read(run_dir) -> RunRecord:
        if str(run_dir) not in cache:
            cache[str(run_dir)] = read_wandb(run_dir)
        return cache[str(run_dir)]

    return read


def test_the_test_split_is_read_only_after_every_training_ended(cv_run):
    result, _, events = cv_run
    assert events.count("fit end") == 2 and "read test" in events
    last_fit = max(i for i, e in enumerate(events) if e == "fit end")
    assert all(i > last_fit for i, e in enumerate(events) if e == "read test")
    assert result.test is not None and len(result.test.predictions.y_true) == 13


def test_folds_are_nested_children_and_the_parent_holds_the_cv_mean_and_std(cv_run):
    result, cfg, _ = cv_run
    uri = cfg["tracking"]["mlflow"]["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent_id = result.tracker.trackers[0].run_id
    parent = read_mlflow(uri, parent_id)
    assert parent.status == "FINISHED" and parent.tags["job_type"] == "cv"
    children = client.search_runs([parent.extra["experiment_id"]], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.data.tags["fold"] for c in children) == ["1", "2"]
    assert {c.data.tags["job_type"] for c in children} == {"fold"}
    for key in ("val/loss", "val/acc", "val/f1_macro"):  # computed from what the children's stores hold
        values = [c.data.metrics[f"best_{key}"] for c in children]
        assert parent.summary[f"cv/{key}_mean"] == pytest.approx(np.mean(values), rel=1e-6)
        assert parent.summary[f"cv/{key}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-6, abs=1e-9)
    for c in children:  # a fold never touches the test split and registers no model
        assert c.data.params["evaluation.run_test"] == "False"
        assert not any(k.startswith("test/") for k in c.data.metrics)
    sent = RunRecord.from_json((result.run_dir / "tracked.json").read_text())
    assert total_lost(diff_records(sent, read_mlflow(uri, parent_id, epoch_metrics=[]), "mlflow")) == 0
    # ONE model, logged by the parent; the quick config on synthetic data registers nothing (tracking.register)
    assert parent.models == ["model"] and parent.extra["registered_versions"] == []
    assert client.search_registered_models() == []
    assert "test/acc" in parent.summary and "checkpoints/best.pt" in parent.artifacts


def test_every_switch_reaches_both_trackers_as_a_param(cv_run, wandb_read):
    result, cfg, _ = cv_run
    mlflow_params = read_mlflow(cfg["tracking"]["mlflow"]["tracking_uri"], result.tracker.trackers[0].run_id).params
    wandb_runs = {json.loads((r.run_dir / "tracked.json").read_text())["extra"]["runs"]["wandb"]["run_dir"]
                  for r in result.folds}
    wandb_runs.add(str(result.tracker.trackers[1].run_dir))  # the W&B parent run too
    stored = [mlflow_params] + [wandb_read(d).params for d in sorted(wandb_runs)]
    assert len(stored) == 4
    for params in stored:
        assert params["resolved.precision"] == "bf16" and params["resolved.pipeline"] == "per_image"
        for key, value in SWITCHES.items():
            assert key in params, key
            assert params[key] in (value, str(value)), (key, params[key], value)


def test_wandb_fold_runs_and_parent_share_one_group(cv_run, wandb_read):
    result, _, _ = cv_run
    refs = [json.loads((r.run_dir / "tracked.json").read_text())["extra"]["runs"]["wandb"] for r in result.folds]
    parent_dir = result.tracker.trackers[1].run_dir
    parent = wandb_read(parent_dir)
    assert parent.extra["group"] == result.run_name and parent.extra["job_type"] == "cv"
    assert parent.summary["cv/val/loss_mean"] == pytest.approx(result.summary["cv/val/loss_mean"])
    assert parent.models == ["customcxrnet"]
    for ref in refs:
        child = wandb_read(ref["run_dir"])
        assert child.extra["group"] == result.run_name and child.extra["job_type"] == "fold" and not child.models


def test_the_ensemble_predicts_the_average_of_the_fold_models_and_evaluate_reproduces_it(cv_run):
    result, cfg, _ = cv_run
    ensemble, ckpt = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert ckpt["kind"] == "ensemble" and len(ckpt["members"]) == 2
    folds = []
    for r in result.folds:
        state = torch.load(r.fit.checkpoint, weights_only=True)
        model = CustomCXRNet(**state["model_hparams"])
        model.load_state_dict(state["model_state"])
        folds.append(model.eval())
    x = torch.from_numpy(result.test.predictions.images[:4, None]).float() / 255
    expected = torch.stack([torch.softmax(m(x), 1) for m in folds]).mean(0)
    torch.testing.assert_close(ensemble.predict_proba(x), expected, rtol=1e-5, atol=1e-6)
    report, _ = evaluate_checkpoint(result.run_dir / "checkpoints" / "best.pt", out_dir=result.run_dir / "eval")
    assert report.metrics["acc"] == pytest.approx(result.test.metrics["acc"])
    assert report.loss == pytest.approx(result.test.loss, rel=1e-5)  # same TTA, criterion and equalisation


def test_retrain_runs_the_cv_chosen_epochs_on_all_of_train_and_registers_by_the_policy(tmp_path, tiny_data_root,
                                                                                        empty_mlflow_store):
    empty_mlflow_store(tmp_path / "mlflow.db")
    cfg = cfg_for(tmp_path, tiny_data_root, "mlflow", **{"training.cv_folds": 2, "training.cv_final": "retrain",
                                                         "training.scheduler": "cosine", "training.epochs": 3,
                                                         "tracking.register": True})
    result = run_cv(cfg)
    # registered on purpose: the parent's one model, with the same tags, description and aliases as a plain run's
    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["mlflow"]["tracking_uri"])
    (version,) = client.search_model_versions("name='CustomCXRNet'")
    assert version.run_id == result.tracker.trackers[0].run_id
    assert version.tags["run_name"] == result.run_name and version.tags["dataset_source"] == "synthetic"
    assert float(version.tags["test/f1_macro"]) == pytest.approx(result.test.metrics["f1_macro"])
    assert result.run_name in version.description
    for alias in ("champion", "latest-synthetic"):
        assert str(client.get_model_version_by_alias("CustomCXRNet", alias).version) == str(version.version)
    assert result.final == "retrain" and result.retrain is not None
    n_pool = len(build_data(cfg["data"], cfg["seed"]).train) + len(build_data(cfg["data"], cfg["seed"]).val)
    assert result.retrain.params["dataset.n_train"] == n_pool and "dataset.n_val" not in result.retrain.params
    assert len(result.retrain.fit.history) == result.chosen_epoch == result.retrain.fit.best_epoch
    assert not any(k.startswith("val/") for k in result.retrain.fit.history[0])
    ckpt = torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["kind"] == "retrain" and ckpt["epoch"] == result.chosen_epoch
    report, _ = evaluate_checkpoint(result.run_dir / "checkpoints" / "best.pt", out_dir=tmp_path / "eval")
    assert report.metrics["acc"] == pytest.approx(result.test.metrics["acc"])


def test_seeds_report_mean_and_std_of_the_children_test_metrics(tmp_path, tiny_data_root, empty_mlflow_store):
    empty_mlflow_store(tmp_path / "mlflow.db")
    cfg = cfg_for(tmp_path, tiny_data_root, "mlflow", **{"training.seeds": 2, "training.epochs": 1})
    result = run_seeds(cfg)
    uri = cfg["tracking"]["mlflow"]["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent_id = result.tracker.trackers[0].run_id
    parent = read_mlflow(uri, parent_id)
    children = client.search_runs([parent.extra["experiment_id"]], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(int(c.data.params["seed"]) for c in children) == [42, 43]
    for key in ("test/acc", "test/f1_macro", "test/loss"):
        values = [c.data.metrics[key] for c in children]
        assert parent.summary[f"seeds/{key}_mean"] == pytest.approx(np.mean(values), rel=1e-6)
        assert parent.summary[f"seeds/{key}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-6, abs=1e-9)
    assert not client.search_model_versions(f"run_id='{parent_id}'")  # a seed study measures; it registers nothing
    sent = RunRecord.from_json((result.run_dir / "tracked.json").read_text())  # what the study's parent was sent
    assert sent.tables == {"seeds/runs": 2} and "seeds/test/acc_mean" in sent.summary
    assert total_lost(diff_records(sent, parent, "mlflow")) == 0


def test_a_tuning_trial_optimises_the_cv_mean(tmp_path, tiny_data_root, empty_mlflow_store):
    import optuna
    import yaml

    from cxrtrack.tuning.space import BaseConfig
    from cxrtrack.tuning.study import tune

    base = BaseConfig(str(CONFIGS / "tune" / "quick.yaml"), values={
        "data.path": str(tiny_data_root), "data.image_size": 64, "training.epochs": 1, "training.cv_folds": 2,
        "output_dir": str(tmp_path / "outputs"),
        "tracking.mlflow.tracking_uri": empty_mlflow_store(tmp_path / "mlflow.db"),
        "tracking.mlflow.artifact_location": str(tmp_path / "mlartifacts"), "tracking.mlflow.system_metrics": False,
        "tracking.log_model": False})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "cv", "method": "grid", "metric": "val/loss",
                                     "params": {"training.lr": [0.001]}}))
    result = tune(space, base, "mlflow")
    trial = optuna.load_study(study_name="cv", storage=result.storage).trials[0]
    summary = json.loads((Path(trial.user_attrs["run_dir"]) / "cv_summary.json").read_text())
    assert trial.value == pytest.approx(summary["stats"]["val/loss"]["mean"])
    assert len(summary["stats"]["val/loss"]["values"]) == 2
