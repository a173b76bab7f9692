"""YAML configuration: loading, inheritance (`extends:`), command-line overrides and validation.

Every config extends ``configs/default.yaml`` (directly or through another config), which lists every
key with its default. A key that ``default.yaml`` does not know, or a value of the wrong type, is an
error naming the fix, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cxrtrack.errors import ConfigError

DEFAULT_CONFIG_NAME = "default.yaml"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"Config file {path} does not exist. Pass an existing YAML file with --config "
            f"(the ones shipped are in configs/: default.yaml, quick.yaml, train.yaml)."
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML ({exc}). Fix the syntax and run again.") from None
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
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, path
    base, root = _load_with_extends((path.parent / Path(parent).expanduser()), (*seen, path))
    return deep_merge(base, data), root


def _check_against(schema: Mapping[str, Any], cfg: Mapping[str, Any], prefix: str, source: str) -> None:
    """Every key in ``cfg`` must exist in ``schema`` (default.yaml) and keep a compatible type."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown setting '{dotted}' in {source}.{hint} Every valid key is listed, with its default, "
                f"in configs/{DEFAULT_CONFIG_NAME}."
            )
        default = schema[key]
        if isinstance(default, Mapping) and default:  # a section with fixed keys
            if not isinstance(value, Mapping):
                raise ConfigError(f"Setting '{dotted}' in {source} must be a section (mapping), not {value!r}.")
            _check_against(default, value, dotted + ".", source)
        elif not _type_ok(default, value):
            raise ConfigError(
                f"Setting '{dotted}' in {source} is {value!r} ({type(value).__name__}); it must be of type "
                f"{_type_name(default)} like the default {default!r}."
            )


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:  # optional settings
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
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
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
}


_MONITOR_MODES = {"val/loss": "min", "val/acc": "max", "val/f1_macro": "max"}


def validate(cfg: Mapping[str, Any]) -> None:
    """Value checks that a type check cannot make (choices and ranges)."""
    for keys, choices in _CHOICES.items():
        value = get_dotted(cfg, keys)
        if value not in choices:
            raise ConfigError(
                f"Setting '{'.'.join(keys)}' is {value!r}; choose one of {', '.join(map(str, choices))}."
            )
    for keys in (("training", "epochs"), ("data", "batch_size"), ("data", "image_size")):
        value = get_dotted(cfg, keys)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"Setting '{'.'.join(keys)}' must be a positive integer, not {value!r}.")
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
    if cfg["data"]["image_size"] < 32:
        raise ConfigError(
            f"Setting 'data.image_size' is {cfg['data']['image_size']}; CustomCXRNet needs at least 32 px "
            f"(supported: 64, 128, 224, 256)."
        )
    rates = cfg["model"]["dropout_conv"]
    if not (isinstance(rates, list) and len(rates) == 3 and all(isinstance(r, (int, float)) for r in rates)):
        raise ConfigError(f"Setting 'model.dropout_conv' must be a list of 3 rates (conv blocks 2-4), not {rates!r}.")
    for rate in [*rates, cfg["model"]["dropout_dense"]]:
        if not 0 <= rate < 1:
            raise ConfigError(f"Dropout rates must be in [0, 1); got {rate!r} in model.dropout_conv / model.dropout_dense.")
    if not 0 < cfg["training"]["lr"] < 10:
        raise ConfigError(f"Setting 'training.lr' must be a positive learning rate such as 0.001, not {cfg['training']['lr']!r}.")
    for keys in (("data", "val_fraction"), ("data", "test_fraction")):
        value = get_dotted(cfg, keys)
        if not 0 < value < 1:
            raise ConfigError(f"Setting '{'.'.join(keys)}' must be between 0 and 1, not {value!r}.")


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
