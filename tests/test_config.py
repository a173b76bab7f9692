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
    ("training.epochs=0", "training.epochs' is 0; it must be an integer between 1 and"),
    ("tracking.wandb.mode=cloud", "auto, online, offline, disabled"),
    ("training.monitor=val/f1", "choose a validation metric: val/loss, val/acc, val/f1_macro"),
    ("training.monitor=train/loss", "choose a validation metric"),
    ("training.monitor=val/acc", "set training.monitor_mode=max"),
    ("data.image_size=16", "an integer between 32 and 512"),
    ("model.dropout_conv=[0.1,0.2]", "list of 3 rates"),
    ("model.dropout_dense=1.0", r"model.dropout_dense' is 1.0; it must be a number between 0 and 1: \[0, 1\)"),
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


def test_a_key_set_twice_is_refused_not_silently_replaced(tmp_path):
    """Issue 14: ``lr: 0.001`` then ``lr: 9.0`` trained at 9.0 without a word."""
    bad = tmp_path / "twice.yaml"
    bad.write_text(f"extends: {CONFIGS / 'default.yaml'}\ntraining:\n  lr: 0.001\n  epochs: 1\n  lr: 9.0\n")
    with pytest.raises(ConfigError, match=r"sets 'lr' twice in one mapping \(lines 3 and 5\).*Keep the one you mean"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"--set tracking.tags sets 'team' twice in one mapping \(both on line 1\)"):
        load_config(CONFIGS / "quick.yaml", ["tracking.tags={team: a, team: b}"])  # a flow mapping on one line too
    merged = tmp_path / "merge.yaml"  # a << merge may be overridden: that is what it is for
    merged.write_text(f"extends: {CONFIGS / 'default.yaml'}\ntraining:\n  <<: {{lr: 0.5}}\n  lr: 0.25\n")
    assert load_config(merged)["training"]["lr"] == 0.25


def test_flatten_roundtrip():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert unflatten(flatten(nested)) == nested


def test_a_config_outside_configs_extending_default(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"extends: {CONFIGS / 'train.yaml'}\ntraining:\n  epochs: 3\n")
    cfg = load_config(mine)
    assert cfg["training"]["epochs"] == 3 and cfg["training"]["class_weights"] == "balanced"
    with pytest.raises(ConfigError, match="Unknown setting 'training.epoch'"):
        mine.write_text(f"extends: {CONFIGS / 'train.yaml'}\ntraining:\n  epoch: 3\n")
        load_config(mine)


def test_a_config_that_does_not_extend_default(tmp_path):
    lone = tmp_path / "lone.yaml"
    lone.write_text("training:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="must extend the project's configs/default.yaml"):
        load_config(lone)


def test_a_bad_tag_name_or_an_over_long_run_name_makes_no_run(tmp_path):
    """Refused while the config is read, so no tracker starts: a tag name MLflow would refuse used to fail 16 s in,
    leaving an empty FAILED run behind; a run name of 128 non-ASCII letters overflowed the 255-byte folder name."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match=r"Tag name 'a!b'.*e\.g\. 'a_b'"):
        load_config(CONFIGS / "quick.yaml", ["tracking.tags.a!b=1"])
    for key in ("../up", "/abs", "a//b"):
        with pytest.raises(ConfigError, match="Tag name"):
            load_config(CONFIGS / "quick.yaml", values={"tracking.tags": {key: "1"}})
    assert load_config(CONFIGS / "quick.yaml", ["tracking.tags.team/vision: x-ray=1"])["tracking"]["tags"]
    with pytest.raises(ConfigError, match="240 bytes in UTF-8.*at most 200 bytes"):
        load_config(CONFIGS / "quick.yaml", ["run_name=" + "é" * 120])

    store = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(CONFIGS / "quick.yaml"),
                           "--tracker", "mlflow", "--set", "tracking.tags.a!b=1",
                           "--set", f"tracking.mlflow.tracking_uri=sqlite:///{store}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "Tag name 'a!b'" in proc.stderr
    assert not store.exists()  # no store was touched, so no run was made
