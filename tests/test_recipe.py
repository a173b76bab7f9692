"""The recipe switches, one by one: what each changes, on tiny data (fast; the tracked-params check of every
switch is in test_selection.py, which reads them back from the stores)."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from cxrtrack.config import load_config
from cxrtrack.data.contrast import equalize_images
from cxrtrack.data.dataset import build_data
from cxrtrack.data.loading import DeviceLoader, build_loaders
from cxrtrack.data.transforms import build_transforms
from cxrtrack.errors import ConfigError, DataError
from cxrtrack.models import CustomCXRNet, build_model
from cxrtrack.models.ensemble import Ensemble, FlipTTA
from cxrtrack.selection.folds import stratified_folds, train_pool
from cxrtrack.training.recipe import Recipe
from cxrtrack.training.run import run_experiment
from cxrtrack.training.trainer import Trainer, build_criterion, build_optimizer, build_scheduler
from tests.conftest import CONFIGS

# -- k-fold splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5])
def test_folds_are_stratified_disjoint_and_cover_train_exactly_once(k):
    labels = [0] * 111 + [1] * 70 + [2] * 70  # the real train/ split's class counts
    folds = stratified_folds(labels, k, seed=7)
    assert len(folds) == k
    seen = Counter()
    for train_idx, val_idx in folds:
        assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == len(labels)
        seen.update(val_idx.tolist())
        counts = Counter(labels[i] for i in val_idx)
        for cls, total in Counter(labels).items():  # each class split as evenly as integers allow
            assert total // k <= counts[cls] <= -(-total // k)
    assert sorted(seen) == list(range(len(labels))) and set(seen.values()) == {1}
    assert stratified_folds(labels, k, seed=7)[0][1].tolist() == folds[0][1].tolist()  # seeded
    assert stratified_folds(labels, k, seed=8)[0][1].tolist() != folds[0][1].tolist()


def test_the_fold_pool_is_train_only_and_too_many_folds_is_a_clear_error(tiny_cfg):
    data = build_data(tiny_cfg["data"], tiny_cfg["seed"])
    pool = train_pool(data)
    assert sorted(map(str, pool.paths)) == sorted(map(str, data.train.split.paths + data.val.split.paths))
    assert not set(pool.paths) & set(data.test.split.paths)
    with pytest.raises(DataError, match="Use fewer folds"):
        stratified_folds(pool.labels, 9, seed=0)  # the tiny set has 8 images of its smallest class


# -- prediction wrappers -------------------------------------------------------------------------------


def test_ensemble_predictions_are_the_average_of_its_members():
    torch.manual_seed(0)
    members = [CustomCXRNet(image_size=64).eval() for _ in range(3)]
    x = torch.randn(5, 1, 64, 64)
    expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    ensemble = Ensemble(members).eval()
    torch.testing.assert_close(ensemble.predict_proba(x), expected, rtol=1e-5, atol=1e-6)
    # its output is log-probabilities: the training criterion reads it as logits of the averaged prediction
    loss = torch.nn.CrossEntropyLoss()(ensemble(x), torch.zeros(5, dtype=torch.long))
    assert loss.item() == pytest.approx(-torch.log(expected[:, 0]).mean().item(), rel=1e-5)


def test_flip_tta_leaves_a_flip_symmetric_input_unchanged_and_averages_otherwise():
    torch.manual_seed(1)
    model = CustomCXRNet(image_size=64).eval()
    x = torch.randn(4, 1, 64, 64)
    symmetric = (x + torch.flip(x, dims=[-1])) / 2
    tta = FlipTTA(model).eval()
    torch.testing.assert_close(tta.predict_proba(symmetric), model.predict_proba(symmetric), rtol=1e-5, atol=1e-6)
    both = (model.predict_proba(x) + model.predict_proba(torch.flip(x, dims=[-1]))) / 2
    torch.testing.assert_close(tta.predict_proba(x), both, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tta.predict_proba(x), model.predict_proba(x))  # an asymmetric input does change


# -- weight averaging ----------------------------------------------------------------------------------


def _trainer(cfg, capture):
    data = build_data(cfg["data"], cfg["seed"])
    loaders = build_loaders(data, cfg, torch.device("cpu"))
    model = build_model(cfg["model"], cfg["data"])
    trainer = Trainer(model, loaders, cfg["training"], torch.device("cpu"), cfg["output_dir"] + "/best.pt",
                      criterion=build_criterion(cfg["training"], data.train.labels, torch.device("cpu")),
                      recipe=Recipe(cfg), callbacks=[capture])
    return trainer


def test_ema_weights_differ_from_the_raw_weights_and_are_the_ones_checkpointed(tiny_cfg):
    tiny_cfg["training"].update(weight_averaging="ema", ema_decay=0.9, epochs=3)
    states = {}

    def capture(epoch, row):
        states[epoch] = {"raw": copy.deepcopy(trainer.model.state_dict()),
                         "ema": copy.deepcopy(trainer.recipe.averaged.module.state_dict())}

    trainer = _trainer(tiny_cfg, capture)
    fit = trainer.fit()
    ckpt = torch.load(fit.checkpoint, weights_only=True)
    assert ckpt["weights"] == "ema"
    saved = states[fit.best_epoch]
    for name, tensor in ckpt["model_state"].items():
        torch.testing.assert_close(tensor, saved["ema"][name])
    assert any(not torch.equal(saved["raw"][n], saved["ema"][n]) for n in saved["raw"])
    # validation scored the EMA weights: re-evaluating the checkpoint gives the logged val/loss
    model = CustomCXRNet(**ckpt["model_hparams"])
    model.load_state_dict(ckpt["model_state"])
    from cxrtrack.training.trainer import evaluate_model

    out = evaluate_model(model, trainer.loaders["val"], torch.device("cpu"), trainer.criterion)
    assert out.loss == pytest.approx(ckpt["metrics"]["val/loss"], rel=1e-5)


def test_swa_averages_the_weights_of_the_epochs_after_swa_start_and_drives_the_lr(tiny_cfg):
    tiny_cfg["training"].update(weight_averaging="swa", swa_start=0.5, swa_lr=0.0002, epochs=4, scheduler="none")
    raw = {}

    def capture(epoch, row):
        raw[epoch] = copy.deepcopy(trainer.model.state_dict())

    trainer = _trainer(tiny_cfg, capture)
    fit = trainer.fit()
    assert trainer.recipe.swa_start_epoch == 3 and int(trainer.recipe.averaged.n_averaged) == 2
    averaged = trainer.recipe.averaged.module.state_dict()
    for name in averaged:
        torch.testing.assert_close(averaged[name], (raw[3][name] + raw[4][name]) / 2, rtol=1e-5, atol=1e-6)
    lrs = [row["lr"] for row in fit.history]
    assert lrs[:3] == pytest.approx([1e-3] * 3) and lrs[3] < 1e-3  # SWALR anneals towards swa_lr from epoch 3


# -- schedule, loss, mixing ----------------------------------------------------------------------------


def test_cosine_with_linear_warmup(tiny_cfg):
    cfg = {**tiny_cfg["training"], "scheduler": "cosine", "warmup_epochs": 2, "epochs": 6, "lr": 0.003}
    opt = build_optimizer(CustomCXRNet(image_size=64), cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.003 * (1 + np.cos(np.pi * t / 4)) / 2 for t in range(4)]
    assert lrs == pytest.approx([0.001, 0.002, *cosine])


def test_label_smoothing_reaches_the_criterion(tiny_cfg):
    tiny_cfg["training"]["label_smoothing"] = 0.1
    assert build_criterion(tiny_cfg["training"], [0, 1, 2], torch.device("cpu")).label_smoothing == 0.1


@pytest.mark.parametrize("key", ["mixup_alpha", "cutmix_alpha"])
def test_mixup_and_cutmix_mix_images_and_labels(tiny_cfg, key):
    tiny_cfg["data"]["augment"][key] = 1.0
    torch.manual_seed(0)
    images, labels = torch.rand(8, 1, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = Recipe(tiny_cfg).train_batch(images, labels)
    assert targets.shape == (8, 3) and torch.allclose(targets.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images) and (targets.max(1).values < 1).any()


# -- data switches -------------------------------------------------------------------------------------


def test_resized_crop_and_shear_are_train_only(tiny_cfg):
    tiny_cfg["data"]["augment"].update(resized_crop=True, crop_scale=[0.5, 0.9], shear=8.0)
    train_tf, eval_tf = build_transforms(tiny_cfg["data"])
    crop = next(t for t in train_tf.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.5, 0.9) and crop.size == (64, 64)
    assert next(t for t in train_tf.transforms if isinstance(t, v2.RandomAffine)).shear == [-8.0, 8.0]
    assert not any(isinstance(t, (v2.RandomResizedCrop, v2.RandomAffine)) for t in eval_tf.transforms)


@pytest.mark.parametrize("mode", ["histogram", "clahe"])
def test_equalisation_is_applied_identically_to_every_split(tiny_cfg, mode):
    plain = build_data(tiny_cfg["data"], tiny_cfg["seed"])
    data = build_data({**tiny_cfg["data"], "equalize": mode}, tiny_cfg["seed"])
    for split in ("train", "val", "test"):
        raw, eq = getattr(plain, split).split.images, getattr(data, split).split.images
        assert eq.dtype == torch.uint8 and eq.shape == raw.shape and not torch.equal(eq, raw)
        assert torch.equal(eq, equalize_images(raw, {**tiny_cfg["data"], "equalize": mode}))


def test_batched_on_device_augmentation_matches_the_per_image_path_where_it_must(tiny_cfg):
    tiny_cfg["data"]["pipeline"] = "batched"
    data = build_data(tiny_cfg["data"], tiny_cfg["seed"])
    loaders = build_loaders(data, tiny_cfg, torch.device("cpu"))
    assert isinstance(loaders["train"], DeviceLoader) and len(loaders["train"]) == -(-len(data.train) // 16)
    images, labels = next(iter(loaders["val"]))  # evaluation: exactly the per-image transform
    expected = torch.stack([data.val.transform(data.val.split.images[i]) for i in range(len(labels))])
    torch.testing.assert_close(images, expected)
    train = loaders["train"]
    same = train.images[:1].expand(8, -1, -1, -1)  # one image 8 times: each copy gets its own random augmentation
    out = train.transform(same)
    assert out.shape == (8, 1, 64, 64) and len({round(float(o.sum()), 3) for o in out}) > 1
    seen = torch.cat([y for _, y in train])
    assert sorted(seen.tolist()) == sorted(data.train.labels)  # every training image once per epoch


def test_auto_settings_resolve_per_device():
    from cxrtrack.data.loading import resolve_pipeline
    from cxrtrack.training.recipe import cpu_has_native_bf16, resolve_precision

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", gpu) == "fp32" and resolve_precision("bf16", gpu) == "bf16"
    assert resolve_pipeline({"pipeline": "auto"}, cpu) == "per_image"
    assert resolve_pipeline({"pipeline": "auto"}, gpu) == "batched"  # on a GPU the data stays on the device
    assert resolve_pipeline({"pipeline": "batched"}, cpu) == "batched"


def test_speed_options_train_to_a_finite_loss(tiny_cfg):
    tiny_cfg["training"].update(channels_last=True, precision="bf16", epochs=1)
    result = run_experiment(tiny_cfg)
    assert result.status == "FINISHED" and np.isfinite(result.fit.history[0]["train/loss"])
    assert result.params["resolved.precision"] == "bf16" and result.params["resolved.pipeline"] == "per_image"


def test_compile_wraps_only_the_training_forward_and_checkpoints_plain_weights(tiny_cfg, tmp_path):
    # Compiling itself takes over a minute on 2 CPU cores, so it runs in scripts/benchmark_speed.py, not here:
    # this checks the wiring (torch.compile compiles lazily, at the first call).
    tiny_cfg["training"]["compile"] = True
    model = CustomCXRNet(image_size=64)
    trainer = Trainer(model, {}, tiny_cfg["training"], torch.device("cpu"), tmp_path / "best.pt",
                      recipe=Recipe(tiny_cfg))
    assert isinstance(trainer.recipe.train_module(), torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.recipe.train_module()._orig_mod is model and trainer.recipe.weights() is model
    trainer.save_checkpoint(1, 0.5, {})
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["model_state"]
    assert not any(k.startswith("_orig_mod") for k in saved)


def test_a_checkpoint_from_before_the_switches_still_evaluates(tiny_cfg, tmp_path):
    from cxrtrack.training.evaluate import evaluate_checkpoint

    tiny_cfg["training"]["epochs"] = 1
    result = run_experiment(tiny_cfg)
    ckpt = torch.load(result.fit.checkpoint, weights_only=True)
    for section, keys in {"data": ("equalize", "clahe_clip_limit", "clahe_grid", "pipeline"),
                          "training": ("label_smoothing", "warmup_epochs", "weight_averaging", "ema_decay", "swa_start",
                                       "swa_lr", "channels_last", "compile", "precision", "cv_folds", "cv_final",
                                       "seeds"),
                          "evaluation": ("tta",)}.items():
        for key in keys:
            del ckpt["config"][section][key]
    for key in ("shear", "resized_crop", "crop_scale", "crop_ratio", "mixup_alpha", "cutmix_alpha"):
        del ckpt["config"]["data"]["augment"][key]
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    report, _ = evaluate_checkpoint(old, out_dir=tmp_path / "eval")
    assert report.metrics["acc"] == pytest.approx(result.test.metrics["acc"])


# -- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, fix", [
    ({"training.warmup_epochs": 2}, "scheduler to cosine"),  # plateau is the default scheduler
    ({"training.cv_folds": 3, "training.cv_final": "retrain"}, "cv_final=ensemble"),
    ({"data.augment.crop_scale": [0.9, 0.5]}, "min <= max"),
    ({"training.weight_averaging": "both"}, "none, ema, swa"),
    ({"training.label_smoothing": 1.5}, "between 0 and 1"),
    ({"training.cv_folds": 0}, r"cv_folds.*between 1 and 50"),
    ({"evaluation.tta": "vflip"}, "none, hflip"),
    ({"data.augment.enabled": False, "data.augment.mixup_alpha": 0.2}, "augment.enabled=true"),
])
def test_bad_recipe_settings_name_the_fix(values, fix):
    with pytest.raises(ConfigError, match=fix):
        load_config(CONFIGS / "quick.yaml", values=values)


def test_the_strong_recipe_loads():
    cfg = load_config(CONFIGS / "recipes" / "strong.yaml")
    assert cfg["training"]["cv_folds"] > 1 and cfg["training"]["weight_averaging"] == "ema"
