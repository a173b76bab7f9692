"""Property: any config file and any --set string either loads into a config the code can run with, or fails
with a one-paragraph ConfigError. Never another exception (a traceback for the user)."""

from __future__ import annotations

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrtrack.config import flatten, load_config, set_dotted
from cxrtrack.data.transforms import build_transforms
from cxrtrack.errors import ConfigError
from cxrtrack.models.cxrnet import CustomCXRNet
from cxrtrack.tracking import tracker_names
from cxrtrack.training.scaffold import make_run_name
from cxrtrack.training.trainer import build_criterion, build_optimizer, build_scheduler
from tests.conftest import CONFIGS

DEFAULT = CONFIGS / "default.yaml"
KEYS = sorted(flatten(yaml.safe_load(DEFAULT.read_text())))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["auto", "cpu", "adam", "sgd", "plateau", "val/loss", "min", "max", "mlflow", "both", "none",
                     "balanced", "offline", "../x", "a/b", "", " ", "x" * 300, "\x00", "1e999", "-1", "0", "512"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=20))


def assert_runnable(cfg: dict) -> None:
    """What the run does with a loaded config before and during training, on tiny stand-ins: none of it may raise
    anything but a ConfigError."""
    build_transforms(cfg["data"])
    tiny = torch.nn.Linear(2, 3)
    optimizer = build_optimizer(tiny, cfg["training"])
    build_scheduler(optimizer, cfg["training"])
    build_criterion(cfg["training"], [0, 1, 2, 2], torch.device("cpu"))
    make_run_name(cfg)
    size = cfg["data"]["image_size"]
    side = size - 2
    for _ in range(4):
        side //= 2
    assert side >= 1 and 128 * side * side * 128 < 20_000_000, size  # the dense layer the model would build
    CustomCXRNet(image_size=size, in_channels=cfg["data"]["channels"], dropout_conv=cfg["model"]["dropout_conv"],
                 dropout_dense=cfg["model"]["dropout_dense"]) if size <= 64 else None
    try:
        tracker_names(cfg["tracking"]["tracker"])
    except ConfigError:
        pass


def assert_clear(exc: ConfigError) -> None:
    message = str(exc)
    assert message and "Traceback" not in message and "object at 0x" not in message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, values, max_size=6))
def test_random_config_files_load_or_fail_clearly(tmp_path, settings_):
    nested: dict = {}
    for key, value in settings_.items():
        try:
            set_dotted(nested, key.split("."), value)
        except ConfigError:
            continue  # "a.b" after "a" was set to a value: not a file anyone could write either
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump({"extends": str(DEFAULT), **nested}, allow_unicode=True))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert_clear(exc)
        return
    assert_runnable(cfg)


set_strings = st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=40)),
    st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}", st.sampled_from(KEYS), values),
)


@settings(max_examples=250, deadline=None)
@given(st.lists(set_strings, max_size=4))
def test_random_set_strings_load_or_fail_clearly(overrides):
    try:
        cfg = load_config(CONFIGS / "quick.yaml", overrides)
    except ConfigError as exc:
        assert_clear(exc)
        return
    assert_runnable(cfg)


def test_default_yaml_and_the_settings_model_hold_the_same_keys():
    """default.yaml gives every setting's default and config.Settings its rules: the same keys in both (extra keys are
    refused, missing ones required), and every default, null ones included, passes its own rules."""
    from cxrtrack.settings import Settings

    Settings.model_validate(yaml.safe_load(DEFAULT.read_text()))
