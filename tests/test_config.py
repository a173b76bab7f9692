"""Config loading: inheritance, overrides, and clear errors for typos and wrong types."""

from __future__ import annotations

import pytest

from cxrtrack.config import flatten, load_config, unflatten
from cxrtrack.errors import ConfigError
from tests.conftest import CONFIGS


def test_quick_extends_default():
    cfg = load_config(CONFIGS / "quick.yaml")
    assert cfg["data"]["image_size"] == 64
    assert cfg["training"]["optimizer"] == "adam"  # inherited
    assert cfg["config_name"] == "quick"


def test_overrides_strings_and_typed_values():
    cfg = load_config(CONFIGS / "train.yaml", ["training.lr=5e-4", "training.optimizer=sgd"], {"training.epochs": 7})
    assert cfg["training"]["lr"] == 0.0005 and cfg["training"]["optimizer"] == "sgd" and cfg["training"]["epochs"] == 7


@pytest.mark.parametrize("override, message", [
    ("training.lrr=0.1", "Unknown setting 'training.lrr'.*Did you mean 'training.lr'"),
    ("training.epochs=many", "training.epochs.*must be of type integer"),
    ("training.optimizer=rmsprop", "choose one of adam, adamw, sgd"),
    ("data.val_fraction=1.5", "between 0 and 1"),
    ("training.epochs=0", "positive integer"),
    ("tracking.wandb.mode=cloud", "auto, online, offline, disabled"),
])
def test_bad_settings_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "quick.yaml", [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*configs/"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flatten_roundtrip():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert unflatten(flatten(nested)) == nested
