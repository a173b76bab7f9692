"""The training loop: checkpoint selection, early stopping, determinism, optimisers, class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from cxrtrack.models import CustomCXRNet
from cxrtrack.training.run import run_experiment
from cxrtrack.training.trainer import Trainer, balanced_class_weights, build_optimizer, build_scheduler


def test_best_checkpoint_is_the_best_validation_epoch(tiny_cfg):
    tiny_cfg["training"]["epochs"] = 4
    result = run_experiment(tiny_cfg)
    losses = [row["val/loss"] for row in result.fit.history]
    best = int(np.argmin(losses)) + 1
    assert result.fit.best_epoch == best
    ckpt = torch.load(result.fit.checkpoint, weights_only=True)
    assert ckpt["epoch"] == best and ckpt["score"] == pytest.approx(min(losses))
    assert ckpt["class_names"] == ["COVID-19", "Normal", "Viral Pneumonia"]
    # The test metrics are those of the best checkpoint, not of the last epoch.
    model = CustomCXRNet(**ckpt["model_hparams"])
    model.load_state_dict(ckpt["model_state"])
    trainer = Trainer(model, {"test": None}, tiny_cfg["training"], torch.device("cpu"), result.fit.checkpoint)
    from cxrtrack.data.dataset import build_data

    loaders = build_data(tiny_cfg["data"], tiny_cfg["seed"]).loaders(16)
    assert trainer.evaluate(loaders["test"]).loss == pytest.approx(result.test.loss, rel=1e-5)


def test_early_stopping(tiny_cfg):
    tiny_cfg["training"].update(epochs=10, early_stopping_patience=2, min_delta=10.0)  # nothing beats epoch 1 by 10
    result = run_experiment(tiny_cfg)
    assert result.fit.stopped_early
    assert len(result.fit.history) == 3 and result.fit.best_epoch == 1


def test_monitor_max_on_f1(tiny_cfg):
    tiny_cfg["training"].update(monitor="val/f1_macro", monitor_mode="max", epochs=3)
    result = run_experiment(tiny_cfg)
    f1 = [row["val/f1_macro"] for row in result.fit.history]
    assert result.fit.best_score == max(f1) and result.fit.best_epoch == f1.index(max(f1)) + 1


def test_same_seed_same_run(tiny_cfg):
    tiny_cfg["training"]["epochs"] = 2
    timing = {"epoch_time_s", "train/images_per_s"}
    a = [{k: v for k, v in row.items() if k not in timing} for row in run_experiment(tiny_cfg).fit.history]
    tiny_cfg["run_name"] = "second"
    b = [{k: v for k, v in row.items() if k not in timing} for row in run_experiment(tiny_cfg).fit.history]
    assert a == b


def test_balanced_class_weights_match_sklearn():
    labels = [0] * 111 + [1] * 70 + [2] * 70
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    np.testing.assert_allclose(balanced_class_weights(labels).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name, cls",
                         [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizers(tiny_cfg, name, cls):
    tiny_cfg["training"]["optimizer"] = name
    assert isinstance(build_optimizer(CustomCXRNet(image_size=64), tiny_cfg["training"]), cls)


@pytest.mark.parametrize("name", ["none", "plateau", "cosine", "step"])
def test_schedulers_and_logged_lr(tiny_cfg, name):
    tiny_cfg["training"].update(scheduler=name, scheduler_step_size=1, scheduler_factor=0.5, epochs=3)
    opt = build_optimizer(CustomCXRNet(image_size=64), tiny_cfg["training"])
    assert (build_scheduler(opt, tiny_cfg["training"]) is None) == (name == "none")
    if name == "step":
        lrs = [row["lr"] for row in run_experiment(tiny_cfg).fit.history]
        assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4])  # the lr used in each epoch is what is logged


def test_plateau_scheduler_steps_on_the_monitored_validation_metric(tiny_cfg):
    # min_delta makes every epoch after the first "no improvement": patience 0 halves the lr each epoch.
    tiny_cfg["training"].update(scheduler="plateau", scheduler_patience=0, scheduler_factor=0.5, min_delta=10.0,
                                epochs=3)
    lrs = [row["lr"] for row in run_experiment(tiny_cfg).fit.history]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4])


def test_epoch_callbacks_see_every_row_and_can_stop_training(tiny_cfg):
    from cxrtrack.training.trainer import StopTraining

    seen = []

    def stop_after_two(epoch, row):
        seen.append((epoch, row["val/loss"]))
        if epoch == 2:
            raise StopTraining("pruned by the test")

    tiny_cfg["training"]["epochs"] = 5
    result = run_experiment(tiny_cfg, callbacks=(stop_after_two,))
    assert result.status == "FINISHED" and result.fit.stopped_early
    assert result.fit.stop_reason == "pruned by the test"
    assert seen == [(row["epoch"], row["val/loss"]) for row in result.fit.history] and len(seen) == 2
    assert result.test is not None  # an early stop is a normal end: the best checkpoint is still evaluated


def test_test_split_is_untouched_when_run_test_is_off(tiny_cfg, monkeypatch):
    from cxrtrack.training import run as run_module

    tiny_cfg["evaluation"]["run_test"] = False
    monkeypatch.setattr(run_module, "report_on_test", lambda *a, **k: pytest.fail("the test split was evaluated"))
    result = run_experiment(tiny_cfg)
    assert result.test is None and "test/acc" not in result.record.summary
    assert result.record.summary["best_epoch"] == result.fit.best_epoch


def test_a_data_cache_decodes_once_and_applies_each_configs_transforms(tiny_cfg, monkeypatch):
    from cxrtrack.data import dataset

    cache = dataset.DataCache()
    first = cache.get(tiny_cfg["data"], tiny_cfg["seed"])
    monkeypatch.setattr(dataset, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    other = {**tiny_cfg["data"], "batch_size": 4, "augment": {**tiny_cfg["data"]["augment"], "enabled": False}}
    second = cache.get(other, tiny_cfg["seed"])
    assert cache.builds == 1 and second.train.split is first.train.split
    assert torch.equal(second.train[0][0], second.val.transform(first.train.split.images[0]))  # no augmentation now
    monkeypatch.undo()
    assert cache.get({**tiny_cfg["data"], "image_size": 32}, tiny_cfg["seed"]).image_size == 32
    assert cache.builds == 2
