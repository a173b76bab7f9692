"""YAML configuration: loading, inheritance (`extends:`), command-line overrides and validation.

Every config extends ``configs/default.yaml`` (directly or through another config), which lists every
key with its default. A key that ``default.yaml`` does not know, or a value of the wrong type, is an
error naming the fix, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cxrtrack import IMAGE_SIZE_RANGE
from cxrtrack.errors import ConfigError

DEFAULT_CONFIG_NAME = "default.yaml"
PROJECT_DEFAULTS = Path(__file__).resolve().parents[2] / "configs" / DEFAULT_CONFIG_NAME  # in a source checkout


MAX_CONFIG_BYTES = 1_000_000  # a config is a few KB; anything this large is a mistake (or an attack)
MAX_EXTENDS_DEPTH = 10


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name``): a config never needs them, and a few lines of nested
    aliases expand to billions of items (the "billion laughs" bomb) after validation has passed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"uses the YAML alias '*{event.anchor}' (line {event.start_mark.line + 1}). Aliases are refused "
                f"(they can expand without bound); write the value out instead"
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values with :class:`_NoAliasLoader`; every failure is a :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({' '.join(str(exc).split())}). Fix the syntax and run again.") from None
    except RecursionError:
        raise ConfigError(f"{where} nests values too deeply to be a config. Fix the file and run again.") from None


def _read_text(path: Path) -> str:
    """The config file as text: only a regular file, at most MAX_CONFIG_BYTES, in UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses anything but a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(
            f"Config file {path} does not exist. Pass an existing YAML file with --config "
            f"(the ones shipped are in configs/: default.yaml, quick.yaml, train.yaml)."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"Config {path} is a folder; --config needs a YAML file such as configs/quick.yaml.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot open config file {path} ({exc.strerror or exc}). Check the path and its permissions.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"Config {path} is a folder; --config needs a YAML file such as configs/quick.yaml.")
        raise ConfigError(f"Config {path} is not a regular file (a pipe, socket or device); --config needs a YAML file.")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"Config file {path} is {info.st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}. "
                              f"Pass the right file with --config.")
        data = f.read(MAX_CONFIG_BYTES + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}). "
            f"Save it as UTF-8 and run again."
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = parse_yaml(_read_text(path), f"Config file {path}")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of settings at the top level, not {type(data).__name__}.")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``override`` (neither argument is modified)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Path]:
    """The merged config and the root of its ``extends`` chain (which must be default.yaml)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"Config {path} extends itself through {' -> '.join(map(str, seen))}; remove the cycle.")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"Config {seen[0]} extends more than {MAX_EXTENDS_DEPTH} configs deep; shorten the chain.")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, path
    if not isinstance(parent, str) or not parent.strip() or "\0" in parent:
        raise ConfigError(f"'extends' in {path} must be the path of another config (a string), not {parent!r}.")
    base, root = _load_with_extends((path.parent / Path(parent).expanduser()), (*seen, path))
    return deep_merge(base, data), root


def _check_against(schema: Mapping[str, Any], cfg: Mapping[str, Any], prefix: str, source: str) -> None:
    """Every key in ``cfg`` must exist in ``schema`` (default.yaml) and keep a compatible type."""
    for key, value in cfg.items():
        if not isinstance(key, str):
            raise ConfigError(f"Setting names in {source} are text; {prefix}{key!r} is a {type(key).__name__}.")
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown setting '{dotted}' in {source}.{hint} Every valid key is listed, with its default, "
                f"in configs/{DEFAULT_CONFIG_NAME}."
            )
        default = schema[key]
        if value is None and default is not None and tuple(dotted.split(".")) not in OPTIONAL_TYPES:
            raise ConfigError(
                f"Setting '{dotted}' in {source} is null; it needs a value of type {_type_name(default)}, like the "
                f"default {default!r} (only the settings documented as 'null: ...' in configs/{DEFAULT_CONFIG_NAME} may be null)."
            )
        if isinstance(default, Mapping) and default:  # a section with fixed keys
            if not isinstance(value, Mapping):
                raise ConfigError(f"Setting '{dotted}' in {source} must be a section (mapping), not {value!r}.")
            _check_against(default, value, dotted + ".", source)
        elif tuple(dotted.split(".")) in AUTO_OR_BOOL and (isinstance(value, bool) or value == "auto"):
            pass
        elif tuple(dotted.split(".")) in AUTO_OR_INT and (isinstance(value, int) or value == "auto"):
            pass  # the range is checked in validate
        elif not _type_ok(default, value):
            raise ConfigError(
                f"Setting '{dotted}' in {source} is {value!r} ({type(value).__name__}); it must be of type "
                f"{_type_name(default)} like the default {default!r}."
            )


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:  # optional settings (null is checked in _check_against and validate)
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _type_name(default: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(
        type(default), type(default).__name__
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.lr=5e-4"`` -> (["training", "lr"], 0.0005); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like key.subkey=value, e.g. training.lr=0.0005.")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw, f"The value of --set {key.strip()}") if raw.strip() else None
    except ConfigError as exc:
        if "alias" in str(exc) or "deeply" in str(exc):
            raise
        value = raw  # not YAML: the text itself (e.g. a name with a colon)
    if isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 as a string
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def set_dotted(cfg: dict[str, Any], keys: list[str], value: Any) -> None:
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Cannot set '{'.'.join(keys)}': '{key}' is a value, not a section.")
    node[keys[-1]] = value


def load_config(
    path: str | Path, overrides: Iterable[str] = (), values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load ``path`` (following ``extends:``), apply overrides and validate the result.

    ``overrides`` are ``"key.sub=value"`` strings (value parsed as YAML, as typed on a command line);
    ``values`` maps dotted keys to already-typed values (e.g. from argparse flags) and wins over both.
    """
    path = Path(path).expanduser()
    cfg, root = _load_with_extends(path)
    if root.name != DEFAULT_CONFIG_NAME:
        raise ConfigError(
            f"Config {path} must extend the project's configs/{DEFAULT_CONFIG_NAME} (directly or through another "
            f"config), which gives every setting its default: add a first line `extends: <path to>/configs/"
            f"{DEFAULT_CONFIG_NAME}` (a path relative to your file, or absolute)."
        )
    override_cfg: dict[str, Any] = {}
    for item in overrides:
        keys, value = parse_override(item)
        set_dotted(override_cfg, keys, value)
    for dotted, value in (values or {}).items():
        set_dotted(override_cfg, dotted.split("."), value)

    schema = _read_yaml(root)
    _check_against(schema, cfg, "", str(path))
    _check_against(schema, override_cfg, "", "the command-line overrides")
    cfg = deep_merge(schema, deep_merge(cfg, override_cfg))
    cfg["config_name"] = path.stem
    validate(cfg)
    return cfg


_CHOICES = {
    ("device",): ("auto", "cpu", "cuda", "mps"),
    ("model", "name"): ("CustomCXRNet",),
    ("training", "optimizer"): ("adam", "adamw", "sgd"),
    ("training", "scheduler"): ("none", "plateau", "cosine", "step"),
    ("training", "class_weights"): ("none", "balanced"),
    ("training", "monitor_mode"): ("min", "max"),
    ("data", "channels"): (1, 3),
    ("tracking", "wandb", "mode"): ("auto", "online", "offline", "disabled"),
    ("data", "equalize"): ("none", "histogram", "clahe"),
    ("training", "weight_averaging"): ("none", "ema", "swa"),
    ("training", "precision"): ("auto", "fp32", "bf16"),
    ("data", "pipeline"): ("auto", "per_image", "batched"),
    ("training", "cv_final"): ("ensemble", "retrain"),
    ("evaluation", "tta"): ("none", "hflip"),
    ("tracking", "register"): ("auto", True, False),
    ("tracking", "champion_mode"): ("max", "min"),
}

# Settings that take "auto" or a boolean.
AUTO_OR_BOOL = {("tracking", "register")}
# Settings that take "auto" or a positive integer.
AUTO_OR_INT = {("threads",): 1024}


_MONITOR_MODES = {"val/loss": "min", "val/acc": "max", "val/f1_macro": "max"}

# Settings whose default is null, and what they hold when set (a null default accepts any type otherwise).
OPTIONAL_TYPES: dict[tuple[str, ...], tuple[type, ...]] = {
    ("run_name",): (str,),
    ("data", "path"): (str,),
    ("training", "grad_clip_norm"): (int, float),
    ("tracking", "group"): (str,),
    ("tracking", "mlflow", "tracking_uri"): (str,),
    ("tracking", "mlflow", "artifact_location"): (str,),
    ("tracking", "mlflow", "registered_model_name"): (str,),
    ("tracking", "wandb", "project"): (str,),
    ("tracking", "wandb", "entity"): (str,),
    ("tracking", "wandb", "registry"): (str,),
}

# name: (low, high, low_inclusive, high_inclusive) for numbers; the rule is stated in the error.
_RANGES: dict[tuple[str, ...], tuple[float, float, bool, bool]] = {
    ("seed",): (0, 2**32 - 1, True, True),
    ("data", "synthetic_seed"): (0, 2**32 - 1, True, True),
    ("data", "image_size"): (*IMAGE_SIZE_RANGE, True, True),
    ("data", "batch_size"): (1, 4096, True, True),
    ("data", "num_workers"): (0, 64, True, True),
    ("data", "decode_workers"): (1, 64, True, True),
    ("data", "val_fraction"): (0, 1, False, False),
    ("data", "test_fraction"): (0, 1, True, False),
    ("data", "normalize_mean"): (-10, 10, True, True),
    ("data", "normalize_std"): (0, 10, False, True),
    ("data", "max_file_mb"): (0, 4096, False, True),
    ("data", "augment", "hflip"): (0, 1, True, True),
    ("data", "augment", "rotation"): (0, 180, True, True),
    ("data", "augment", "translate"): (0, 1, True, False),
    ("data", "augment", "brightness"): (0, 1, True, True),
    ("data", "augment", "contrast"): (0, 1, True, True),
    ("data", "clahe_clip_limit"): (0, 1000, True, True),
    ("data", "clahe_grid"): (1, 64, True, True),
    ("data", "augment", "shear"): (0, 60, True, True),
    ("data", "augment", "mixup_alpha"): (0, 100, True, True),
    ("data", "augment", "cutmix_alpha"): (0, 100, True, True),
    ("model", "dropout_dense"): (0, 1, True, False),
    ("training", "epochs"): (1, 100_000, True, True),
    ("training", "lr"): (0, 10, False, False),
    ("training", "weight_decay"): (0, 1, True, True),
    ("training", "momentum"): (0, 1, True, False),
    ("training", "scheduler_patience"): (0, 100_000, True, True),
    ("training", "scheduler_factor"): (0, 1, False, False),
    ("training", "scheduler_step_size"): (1, 100_000, True, True),
    ("training", "early_stopping_patience"): (0, 100_000, True, True),
    ("training", "min_delta"): (0, 1e6, True, True),
    ("training", "grad_clip_norm"): (0, 1e9, False, True),
    ("training", "label_smoothing"): (0, 1, True, False),
    ("training", "warmup_epochs"): (0, 100_000, True, True),
    ("training", "ema_decay"): (0, 1, True, False),
    ("training", "swa_start"): (0, 1, True, False),
    ("training", "swa_lr"): (0, 10, False, True),
    ("training", "cv_folds"): (1, 50, True, True),
    ("training", "seeds"): (1, 1000, True, True),
    ("evaluation", "n_prediction_images"): (0, 1000, True, True),
    ("tracking", "mlflow", "system_metrics_interval"): (0.1, 86400, True, True),
    ("tracking", "mlflow", "http_timeout"): (1, 600, True, True),
    ("tracking", "mlflow", "http_retries"): (0, 10, True, True),
    ("tracking", "mlflow", "reconnect_interval"): (0, 86400, True, True),
    ("tracking", "wandb", "system_metrics_interval"): (0.1, 86400, True, True),
    ("tracking", "wandb", "init_timeout"): (1, 3600, True, True),
}
_INTEGERS = {("seed",), ("data", "synthetic_seed"), ("data", "image_size"), ("data", "batch_size"),
             ("data", "num_workers"), ("data", "decode_workers"), ("training", "epochs"),
             ("training", "scheduler_patience"), ("training", "scheduler_step_size"),
             ("training", "early_stopping_patience"), ("evaluation", "n_prediction_images"),
             ("tracking", "mlflow", "http_timeout"), ("tracking", "mlflow", "http_retries"), ("data", "clahe_grid"),
             ("training", "warmup_epochs"), ("training", "cv_folds"), ("training", "seeds")}
# A run name becomes a folder under output_dir and a tracker run name: a name, never a path.
RUN_NAME_PATTERN = re.compile(r"[^\W_][\w.+=@,-]{0,127}")
# W&B refuses these characters in project names; MLflow accepts them, so one rule serves both.
_PROJECT_PATTERN = re.compile(r"[^/\\#?%:\x00-\x1f]{1,128}")
_ARTIFACT_PATTERN = re.compile(r"[\w.-]{1,128}")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 100, 250, 5000


def _bad(keys: tuple[str, ...], value: Any, rule: str) -> ConfigError:
    return ConfigError(f"Setting '{'.'.join(keys)}' is {value!r}; {rule}.")


def _check_number(keys: tuple[str, ...], value: Any) -> None:
    low, high, low_in, high_in = _RANGES[keys]
    integer = keys in _INTEGERS
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise _bad(keys, value, f"it must be {kind}")
    if (value < low or (value == low and not low_in)) or (value > high or (value == high and not high_in)):
        lo, hi = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in (low, high))
        interval = f"{'[' if low_in else '('}{lo}, {hi}{']' if high_in else ')'}"
        raise _bad(keys, value, f"it must be {kind} between {lo} and {hi}: {interval}")


def _walk_strings(node: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_strings(value, f"{path}[{i}]")


def _check_tags(tags: Any) -> None:
    if not isinstance(tags, Mapping):
        raise _bad(("tracking", "tags"), tags, "it must be a mapping of tag names to values")
    if len(tags) > MAX_TAGS:
        raise ConfigError(f"Setting 'tracking.tags' has {len(tags)} tags; at most {MAX_TAGS} are allowed.")
    for key, value in tags.items():
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_TAG_KEY:
            raise ConfigError(f"Tag name {key!r} in tracking.tags must be text of 1 to {MAX_TAG_KEY} characters.")
        if isinstance(value, (Mapping, list)) or not isinstance(value, (str, int, float, bool, type(None))):
            raise ConfigError(f"Tag 'tracking.tags.{key}' is {value!r}; a tag value is one piece of text or a number.")
        if len(str(value)) > MAX_TAG_VALUE:
            raise ConfigError(f"Tag 'tracking.tags.{key}' is {len(str(value)):,} characters; at most {MAX_TAG_VALUE:,}.")


def validate(cfg: Mapping[str, Any]) -> None:
    """Value checks that a type check cannot make (choices, ranges, names). A config that passes can be run:
    every rule here is one the code relies on later, stated in the error message."""
    for where, text in _walk_strings(cfg):
        if "\0" in text:
            raise ConfigError(f"Setting '{where}' contains a NUL character; remove it.")
    for keys, types in OPTIONAL_TYPES.items():
        value = get_dotted(cfg, keys)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            kind = "text" if types == (str,) else "a number"
            raise _bad(keys, value, f"it must be {kind} or null")
        if isinstance(value, str) and not value.strip():
            raise _bad(keys, value, "it must not be empty (use null for the default)")
    for keys, choices in _CHOICES.items():
        value = get_dotted(cfg, keys)
        if (isinstance(value, bool) and keys not in AUTO_OR_BOOL) or value not in choices:
            raise ConfigError(
                f"Setting '{'.'.join(keys)}' is {value!r}; choose one of {', '.join(map(str, choices))}."
            )
    for keys, high in AUTO_OR_INT.items():
        value = get_dotted(cfg, keys)
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise _bad(keys, value, f"it must be auto or an integer from 1 to {high}")
    for keys in _RANGES:
        value = get_dotted(cfg, keys)
        if value is not None or keys not in OPTIONAL_TYPES:
            _check_number(keys, value)
    for keys in (("output_dir",), ("data", "kaggle_handle"), ("data", "download_dir"), ("data", "synthetic_dir"),
                 ("tracking", "wandb", "dir")):
        if not get_dotted(cfg, keys).strip():
            raise _bad(keys, get_dotted(cfg, keys), "it must not be empty")
    run_name = cfg.get("run_name")
    if run_name is not None and not RUN_NAME_PATTERN.fullmatch(run_name):
        raise ConfigError(
            f"Run name {run_name!r} is not a plain name: use 1 to 128 letters, digits and . _ - + = @ , starting with a "
            f"letter or digit (no '/', no '..', no spaces). It names the folder {cfg['output_dir']}/<run name> and the "
            f"tracked run."
        )
    for keys in (("experiment",), ("tracking", "wandb", "project")):
        value = get_dotted(cfg, keys)
        if value is not None and not _PROJECT_PATTERN.fullmatch(value):
            raise _bad(keys, value, "it must be 1 to 128 characters without / \\ # ? % : or control characters "
                                    "(it names the MLflow experiment and the W&B project)")
    name = cfg["tracking"]["wandb"]["model_artifact_name"]
    if not _ARTIFACT_PATTERN.fullmatch(name):
        raise _bad(("tracking", "wandb", "model_artifact_name"), name, "use 1 to 128 letters, digits, '-', '_' or '.'")
    _check_tags(cfg["tracking"]["tags"])
    monitor, mode = cfg["training"]["monitor"], cfg["training"]["monitor_mode"]
    if monitor not in _MONITOR_MODES:
        raise ConfigError(
            f"Setting 'training.monitor' is {monitor!r}; choose a validation metric: {', '.join(_MONITOR_MODES)} "
            f"(checkpoints are selected on validation data, never on train or test)."
        )
    if mode != _MONITOR_MODES[monitor]:
        raise ConfigError(
            f"training.monitor {monitor!r} improves when it goes {'down' if _MONITOR_MODES[monitor] == 'min' else 'up'}: "
            f"set training.monitor_mode={_MONITOR_MODES[monitor]} (it is {mode!r}, which would keep the worst checkpoint)."
        )
    champion = cfg["tracking"]["champion_metric"]
    if not (champion.startswith("test/") and len(champion) > 5):
        raise _bad(("tracking", "champion_metric"), champion, "name a test metric such as test/f1_macro, test/acc or "
                                                              "test/roc_auc_ovr_macro (models are compared on the test split)")
    rates = cfg["model"]["dropout_conv"]
    if not (isinstance(rates, list) and len(rates) == 3
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in rates)):
        raise ConfigError(f"Setting 'model.dropout_conv' must be a list of 3 rates in [0, 1) (conv blocks 2-4), not {rates!r}.")
    scale = cfg["data"]["augment"]["scale"]
    if not (isinstance(scale, list) and len(scale) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scale)
            and 0 < scale[0] <= scale[1] <= 10):
        raise ConfigError(f"Setting 'data.augment.scale' must be [low, high] with 0 < low <= high <= 10, like [0.95, 1.05]; "
                          f"got {scale!r}.")
    validate_recipe(cfg)


def with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` (e.g. the config stored in an older checkpoint) completed with the project's defaults for keys it lacks."""
    if not PROJECT_DEFAULTS.is_file():
        return dict(cfg)
    return deep_merge(_read_yaml(PROJECT_DEFAULTS), cfg)


def _pair(cfg: Mapping[str, Any], keys: tuple[str, ...], low: float, high: float) -> None:
    value = get_dotted(cfg, keys)
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and low <= value[0] <= value[1] <= high):
        raise ConfigError(f"Setting '{'.'.join(keys)}' must be a range [min, max] with {low} <= min <= max <= {high}, "
                          f"not {value!r}.")


def validate_recipe(cfg: Mapping[str, Any]) -> None:
    """The model-quality switches (docs/model-quality.md): ranges of pairs, and combinations that cannot work
    (the single numbers are in _RANGES)."""
    train, aug = cfg["training"], cfg["data"]["augment"]
    _pair(cfg, ("data", "augment", "crop_scale"), 0.05, 1.0)
    _pair(cfg, ("data", "augment", "crop_ratio"), 0.2, 5.0)
    if train["warmup_epochs"] and train["scheduler"] == "plateau":
        raise ConfigError(
            "training.warmup_epochs needs a scheduler that does not react to validation: set training.scheduler to "
            "cosine, step or none, or training.warmup_epochs=0 (plateau cannot follow a warm-up).")
    if train["warmup_epochs"] >= train["epochs"]:
        raise ConfigError(f"training.warmup_epochs ({train['warmup_epochs']}) must be fewer than training.epochs "
                          f"({train['epochs']}).")
    if train["cv_folds"] > 1 and train["cv_final"] == "retrain" and train["scheduler"] == "plateau":
        raise ConfigError(
            "training.cv_final=retrain trains on all of train/ with no validation split, so the plateau scheduler "
            "(which follows the validation metric) cannot be replayed: set training.scheduler to cosine, step or none, "
            "or use training.cv_final=ensemble.")
    if (aug["mixup_alpha"] or aug["cutmix_alpha"]) and not aug["enabled"]:
        raise ConfigError("data.augment.mixup_alpha / cutmix_alpha are augmentations: set data.augment.enabled=true, "
                          "or set them to 0.")


def get_dotted(cfg: Mapping[str, Any], keys: Iterable[str]) -> Any:
    node: Any = cfg
    for key in keys:
        node = node[key]
    return node


def flatten(cfg: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"data": {"image_size": 128}}`` -> ``{"data.image_size": 128}`` (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Inverse of :func:`flatten`: ``{"data.image_size": 128}`` -> ``{"data": {"image_size": 128}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(nested, key.split(sep), value)
    return nested
