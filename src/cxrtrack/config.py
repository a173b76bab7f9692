"""YAML configuration: loading, inheritance (`extends:`), command-line overrides and validation.

Every config extends ``configs/default.yaml`` (directly or through another config), which lists every
key with its default. A key that ``default.yaml`` does not know, or a value of the wrong type, is an
error naming the fix, so a typo never silently falls back to a default. What each setting may be is
written once, in :mod:`cxrtrack.settings`; this module reads the files, which may be hostile (size,
encoding, YAML aliases, ``extends:`` cycles), and merges them.
"""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cxrtrack.errors import ConfigError
from cxrtrack.settings import RUN_NAME_PATTERN, check, known_keys

__all__ = ["RUN_NAME_PATTERN"]  # also imported from here by the code that names runs and folders

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

    def construct_mapping(self, node, deep=False):
        """A mapping that sets one key twice is refused: YAML keeps the last value silently, so ``lr: 0.001`` and
        a forgotten ``lr: 9.0`` further down would train at 9.0. (Keys brought in by a ``<<`` merge may be
        overridden; that is what a merge is for.)"""
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    earlier = first.get(key)
                except TypeError:  # an unhashable key: SafeConstructor says so below
                    continue
                if earlier is not None:
                    where = f"lines {earlier} and {line}" if earlier != line else f"both on line {line}"
                    raise ConfigError(
                        f"sets {key!r} twice in one mapping ({where}); YAML would keep the second value silently. "
                        f"Keep the one you mean and delete the other"
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values with :class:`_NoAliasLoader`; every failure is a :class:`ConfigError`."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}.") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{where} is not valid YAML ({reason}). Fix the syntax and run again.") from None
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
        raise ConfigError(
            f"Config {path} is a folder; --config needs a YAML file such as configs/quick.yaml.") from None
    except OSError as exc:
        raise ConfigError(
            f"Cannot open config file {path} ({exc.strerror or exc}). Check the path and its permissions.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"Config {path} is a folder; --config needs a YAML file such as configs/quick.yaml.")
        raise ConfigError(
            f"Config {path} is not a regular file (a pipe, socket or device); --config needs a YAML file.")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"Config file {path} is {info.st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}. "
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
        raise ConfigError(
            f"Config file {path} must hold a mapping of settings at the top level, not {type(data).__name__}.")
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


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.lr=5e-4"`` -> (["training", "lr"], 0.0005); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like key.subkey=value, e.g. training.lr=0.0005.")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw, f"The value of --set {key.strip()}") if raw.strip() else None
    except ConfigError as exc:
        if "alias" in str(exc) or "deeply" in str(exc) or "twice in one mapping" in str(exc):
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

    defaults = _read_yaml(root)
    merged = deep_merge(defaults, deep_merge(cfg, override_cfg))
    check(merged, [(cfg, str(path)), (override_cfg, "the command-line overrides")], defaults)
    merged["config_name"] = path.stem
    return merged


def validate(cfg: Mapping[str, Any]) -> None:
    """Check a config that did not come through :func:`load_config` (one saved in a checkpoint or a run folder): every
    rule the code relies on later, stated in the error. Keys this version does not know are left alone."""
    check(known_keys(cfg))


def with_values(cfg: Mapping[str, Any], values: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """A loaded ``cfg`` with dotted ``values`` merged in as ``--set`` merges them, checked like :func:`load_config`."""
    override: dict[str, Any] = {}
    for dotted, value in values.items():
        set_dotted(override, dotted.split("."), value)
    merged = deep_merge(cfg, override)
    check({k: v for k, v in merged.items() if k != "config_name"}, [(override, source)])
    return merged


def with_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` (e.g. the config stored in an older checkpoint) completed with the project's defaults for the keys
    it lacks."""
    if not PROJECT_DEFAULTS.is_file():
        return dict(cfg)
    return deep_merge(_read_yaml(PROJECT_DEFAULTS), cfg)


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
