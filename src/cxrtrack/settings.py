"""What every setting may be: its type, range, choices and the rules that tie settings together, written once.

``configs/default.yaml`` gives each setting its default (with the comments users read); :class:`Settings` says what
values it may take. The models only validate: the code reads the plain dict that :func:`cxrtrack.config.load_config`
returns. Pydantic's own errors are not user messages: :func:`check` tells the first one as one paragraph naming
the key, where it was set and the fix (as every other :class:`~cxrtrack.errors.ConfigError`).
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from cxrtrack import IMAGE_SIZE_RANGE
from cxrtrack.errors import ConfigError

DEFAULTS_FILE = "configs/default.yaml"

_MONITOR_MODES = {"val/loss": "min", "val/acc": "max", "val/f1_macro": "max"}
# A run name becomes a folder under output_dir and a tracker run name: a name, never a path.
RUN_NAME_PATTERN = re.compile(r"[^\W_][\w.+=@,-]{0,127}")
# W&B refuses these characters in project names; MLflow accepts them, so one rule serves both.
_PROJECT_PATTERN = re.compile(r"[^/\\#?%:\x00-\x1f]{1,128}")
_ARTIFACT_PATTERN = re.compile(r"[\w.-]{1,128}")
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 100, 250, 5000
TAG_KEY_PATTERN = re.compile(r"[\w.\- :/]+")
TAG_KEY_BAD = re.compile(r"[^\w.\- :/]+")
MAX_RUN_NAME_BYTES = 200  # a folder name holds 255 bytes; a CV's or seed study's runs add "-fold5", "-seed42", ...
SEED_MAX = 2**32 - 1


def _error(text: str, kind: str = "message") -> PydanticCustomError:
    """``kind`` "message": reported as is; "setting": as "Setting '<key>' <text>."; "rule": as "Setting '<key>' is
    <value>; <text>."."""
    return PydanticCustomError(kind, "{text}", {"text": text})


def _rule(test: Callable[[Any], Any], text: str, kind: str = "rule") -> AfterValidator:
    """A rule pydantic's types cannot say; ``text`` may show the value with ``{!r}``."""
    def check(value: Any) -> Any:
        if value is not None and not test(value):
            raise _error(text.format(value), kind)
        return value
    return AfterValidator(check)


def _numbers(value: list, n: int) -> bool:
    return len(value) == n and all(type(x) in (int, float) and math.isfinite(x) for x in value)


def _check_tags(tags: dict) -> dict:
    if len(tags) > MAX_TAGS:
        raise _error(f"has {len(tags)} tags; at most {MAX_TAGS} are allowed", "setting")
    for key, value in tags.items():
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_TAG_KEY:
            raise _error(f"Tag name {key!r} in tracking.tags must be text of 1 to {MAX_TAG_KEY} characters.")
        # MLflow's rule for tag names, checked here so that a bad one makes no run at all (the store would refuse it
        # only after the run started, leaving an empty FAILED run behind)
        normal = posixpath.normpath(key)
        if not TAG_KEY_PATTERN.fullmatch(key) or normal != key or normal.startswith(("..", "/")):
            suggestion = TAG_KEY_BAD.sub("_", key).strip("/") or "tag"
            raise _error(f"Tag name {key!r} in tracking.tags may only contain letters, digits, spaces and _ - . : / "
                         f"(no leading '/', no '..' or '//'), as MLflow requires of tag names; rename it, e.g. "
                         f"{suggestion!r}.")
        if isinstance(value, (Mapping, list)) or not isinstance(value, (str, int, float, bool, type(None))):
            raise _error(f"Tag 'tracking.tags.{key}' is {value!r}; a tag value is one piece of text or a number.")
        if len(str(value)) > MAX_TAG_VALUE:
            raise _error(f"Tag 'tracking.tags.{key}' is {len(str(value)):,} characters; at most {MAX_TAG_VALUE:,}.")
    return tags


Text = Annotated[str, _rule(str.strip, "it must not be empty")]
OptionalText = Annotated[str | None, _rule(str.strip, "it must not be empty (use null for the default)")]
ProjectName = _rule(_PROJECT_PATTERN.fullmatch, "it must be 1 to 128 characters without / \\ # ? % : or control "
                                                 "characters (it names the MLflow experiment and the W&B project)")
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Count = Annotated[int, Field(ge=0, le=100_000)]  # epochs of patience, warm-up...
Probability = Annotated[float, Field(ge=0, le=1)]
Rate = Annotated[float, Field(ge=0, lt=1)]  # a fraction that must leave something: dropout, decay, smoothing
Interval = Annotated[float, Field(ge=0.1, le=86400)]  # seconds between system-metric samples


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Augment(_Section):
    enabled: bool
    hflip: Probability
    rotation: float = Field(ge=0, le=180)
    translate: Rate
    scale: Annotated[list, _rule(lambda v: _numbers(v, 2) and 0 < v[0] <= v[1] <= 10, "must be [low, high] with "
                                  "0 < low <= high <= 10, like [0.95, 1.05]; got {!r}", "setting")]
    shear: float = Field(ge=0, le=60)
    resized_crop: bool
    crop_scale: Annotated[list, _rule(lambda v: _numbers(v, 2) and 0.05 <= v[0] <= v[1] <= 1, "must be a range "
                                       "[min, max] with 0.05 <= min <= max <= 1.0, not {!r}", "setting")]
    crop_ratio: Annotated[list, _rule(lambda v: _numbers(v, 2) and 0.2 <= v[0] <= v[1] <= 5, "must be a range "
                                       "[min, max] with 0.2 <= min <= max <= 5.0, not {!r}", "setting")]
    brightness: Probability
    contrast: Probability
    mixup_alpha: float = Field(ge=0, le=100)
    cutmix_alpha: float = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _mixing_needs_augmentation(self) -> Augment:
        if (self.mixup_alpha or self.cutmix_alpha) and not self.enabled:
            raise _error("data.augment.mixup_alpha / cutmix_alpha are augmentations: set data.augment.enabled=true, "
                         "or set them to 0.")
        return self


class Data(_Section):
    path: OptionalText
    kaggle_handle: Text
    download_dir: Text
    synthetic_dir: Text
    synthetic_seed: Seed
    image_size: int = Field(ge=IMAGE_SIZE_RANGE[0], le=IMAGE_SIZE_RANGE[1])
    channels: Annotated[int, _rule(lambda c: c in (1, 3), "choose one of 1, 3")]  # int: YAML's true is not 1
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: Rate  # 0: no test split
    batch_size: int = Field(ge=1, le=4096)
    num_workers: int = Field(ge=0, le=64)
    decode_workers: int = Field(ge=1, le=64)
    max_file_mb: float = Field(gt=0, le=4096)
    pipeline: Literal["auto", "per_image", "batched"]
    normalize_mean: float = Field(ge=-10, le=10)
    normalize_std: float = Field(gt=0, le=10)
    equalize: Literal["none", "histogram", "clahe"]
    clahe_clip_limit: float = Field(ge=0, le=1000)
    clahe_grid: int = Field(ge=1, le=64)
    augment: Augment


class Model(_Section):
    name: Literal["CustomCXRNet"]
    dropout_conv: Annotated[list, _rule(lambda v: _numbers(v, 3) and all(0 <= r < 1 for r in v), "must be a list of "
                                         "3 rates in [0, 1) (conv blocks 2-4), not {!r}", "setting")]
    dropout_dense: Rate


class Training(_Section):
    epochs: int = Field(ge=1, le=100_000)
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float = Field(gt=0, lt=10)
    weight_decay: Probability
    momentum: Rate
    class_weights: Literal["none", "balanced"]
    scheduler: Literal["none", "plateau", "cosine", "step"]
    scheduler_patience: Count
    scheduler_factor: float = Field(gt=0, lt=1)
    scheduler_step_size: int = Field(ge=1, le=100_000)
    monitor: Annotated[str, _rule(_MONITOR_MODES.__contains__,
                                  f"choose a validation metric: {', '.join(_MONITOR_MODES)} "
                                  "(checkpoints are selected on validation data, never on train or test)")]
    monitor_mode: Literal["min", "max"]
    early_stopping_patience: Count
    min_delta: float = Field(ge=0, le=1e6)
    grad_clip_norm: float | None = Field(gt=0, le=1e9)  # null: no clipping
    deterministic: bool
    label_smoothing: Rate
    warmup_epochs: Count
    weight_averaging: Literal["none", "ema", "swa"]
    ema_decay: Rate
    swa_start: Rate
    swa_lr: float = Field(gt=0, le=10)
    channels_last: bool
    compile: bool
    precision: Literal["auto", "fp32", "bf16"]
    cv_folds: int = Field(ge=1, le=50)
    cv_final: Literal["ensemble", "retrain"]
    seeds: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _combinations(self) -> Training:
        best = _MONITOR_MODES[self.monitor]
        if self.monitor_mode != best:
            direction = "down" if best == "min" else "up"
            raise _error(f"training.monitor {self.monitor!r} improves when it goes {direction}: "
                         f"set training.monitor_mode={best} (it is {self.monitor_mode!r}, which would keep the worst "
                         f"checkpoint).")
        if self.warmup_epochs and self.scheduler == "plateau":
            raise _error("training.warmup_epochs needs a scheduler that does not react to validation: set "
                         "training.scheduler to cosine, step or none, or training.warmup_epochs=0 (plateau cannot "
                         "follow a warm-up).")
        if self.warmup_epochs >= self.epochs:
            raise _error(f"training.warmup_epochs ({self.warmup_epochs}) must be fewer than training.epochs "
                         f"({self.epochs}).")
        if self.cv_folds > 1 and self.cv_final == "retrain" and self.scheduler == "plateau":
            raise _error("training.cv_final=retrain trains on all of train/ with no validation split, so the plateau "
                         "scheduler (which follows the validation metric) cannot be replayed: set training.scheduler "
                         "to cosine, step or none, or use training.cv_final=ensemble.")
        return self


class Evaluation(_Section):
    run_test: bool
    n_prediction_images: int = Field(ge=0, le=1000)
    tta: Literal["none", "hflip"]


class MLflow(_Section):
    tracking_uri: OptionalText
    artifact_location: OptionalText
    registered_model_name: OptionalText
    system_metrics: bool
    system_metrics_interval: Interval
    async_logging: bool
    model_format: Literal["pt2", "pickle"]
    http_timeout: int = Field(ge=1, le=600)
    http_retries: int = Field(ge=0, le=10)
    reconnect_interval: float = Field(ge=0, le=86400)


class Wandb(_Section):
    project: Annotated[OptionalText, ProjectName]
    entity: OptionalText
    mode: Literal["auto", "online", "offline", "disabled"]
    system_metrics_interval: Interval
    init_timeout: float = Field(ge=1, le=3600)
    verify_offline: bool
    dir: Text
    model_artifact_name: Annotated[str, _rule(_ARTIFACT_PATTERN.fullmatch,
                                              "use 1 to 128 letters, digits, '-', '_' or '.'")]
    registry: OptionalText


class Tracking(_Section):
    tracker: str  # names are checked by cxrtrack.tracking.tracker_names
    tags: Annotated[dict, AfterValidator(_check_tags)]
    group: OptionalText
    log_model: bool
    register_: Literal["auto"] | bool = Field(alias="register", description="auto, true or false")  # as register, a
    # field would hide BaseModel.register
    champion_metric: Annotated[str, _rule(lambda m: m.startswith("test/") and len(m) > 5,
                                          "name a test metric such as test/f1_macro, test/acc or "
                                          "test/roc_auc_ovr_macro (models are compared on the test split)")]
    champion_mode: Literal["max", "min"]
    mlflow: MLflow
    wandb: Wandb


class Settings(_Section):
    """Every setting of configs/default.yaml, which holds their defaults."""

    experiment: Annotated[str, ProjectName]
    run_name: OptionalText
    seed: Seed
    device: Literal["auto", "cpu", "cuda", "mps"]
    threads: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = Field(
        description="auto or an integer from 1 to 1024")  # the rule a wrong value is told
    output_dir: Text
    data: Data
    model: Model
    training: Training
    evaluation: Evaluation
    tracking: Tracking

    @model_validator(mode="after")
    def _run_name_is_a_name(self) -> Settings:
        if self.run_name is not None and not RUN_NAME_PATTERN.fullmatch(self.run_name):
            raise _error(f"Run name {self.run_name!r} is not a plain name: use 1 to 128 letters, "
                         f"digits and . _ - + = @ , starting with a letter or digit (no '/', no '..', no spaces). "
                         f"It names the folder {self.output_dir}/<run name> and the tracked run.")
        if self.run_name is not None and len(self.run_name.encode()) > MAX_RUN_NAME_BYTES:
            raise _error(f"Run name {self.run_name[:40]!r}... is {len(self.run_name.encode())} bytes in UTF-8; "
                         f"it names a folder, and a folder name holds at most 255 bytes (a CV's or seed study's runs "
                         f"add a suffix): use at most {MAX_RUN_NAME_BYTES} bytes (fewer non-ASCII letters).")
        return self


# -- pydantic's errors, told as one paragraph naming the key and the fix ------------------------------------------

_TYPE_NAMES = {"int_type": "integer", "float_type": "number", "string_type": "string", "bool_type": "boolean",
               "list_type": "list", "dict_type": "mapping"}
_BOUNDS = {"gt": (0, False), "ge": (0, True), "lt": (1, False), "le": (1, True)}


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields of ``model`` by the name a config uses (the alias, if any)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _field(loc: tuple) -> tuple[tuple[str, ...], type[BaseModel] | None, FieldInfo | None, tuple]:
    """Walk ``loc`` down the sections: (the setting's keys, the section it is in, its field, the rest of ``loc``)."""
    keys: list[str] = []
    model: type[BaseModel] | None = Settings
    field = None
    for i, part in enumerate(loc):
        fields = _fields(model) if model else {}
        if part not in fields:
            return tuple(keys), model, field, loc[i:]
        keys.append(part)
        field = fields[part]
        model = _model(field.annotation)
    return tuple(keys), model, field, ()


def _number_rule(field: FieldInfo) -> str:
    bounds: list[Any] = [None, None, True, True]
    for constraint in field.metadata:
        for name, (side, inclusive) in _BOUNDS.items():
            if hasattr(constraint, name):
                bounds[side], bounds[side + 2] = getattr(constraint, name), inclusive
    low, high, low_in, high_in = bounds
    kind = "an integer" if field.annotation is int else "a number"
    lo, hi = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in (low, high))
    return f"it must be {kind} between {lo} and {hi}: {'[' if low_in else '('}{lo}, {hi}{']' if high_in else ')'}"


def _message(error: Mapping[str, Any], cfg: Mapping[str, Any], sources: Sequence[tuple[Mapping, str | None]],
             defaults: Mapping[str, Any] | None) -> str:
    kind, loc = error["type"], tuple(error["loc"])
    keys, model, field, rest = _field(loc)
    dotted = ".".join(keys)
    annotation = field.annotation if field is not None else None  # no field: the error is about the config as a whole

    def where(at: tuple = keys) -> str:  # " in <the last source that sets it>"
        name = next((name for part, name in reversed(sources) if _lookup(part, at) is not _MISSING), None)
        return f" in {name}" if name else ""

    if kind == "message":
        return error["ctx"]["text"]
    if kind == "setting":
        return f"Setting '{dotted}' {error['ctx']['text']}."
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(rest[0]), list(_fields(model)) if model is not None else [], n=1)
        hint = f" Did you mean '{'.'.join((*keys, close[0]))}'?" if close else ""
        return (f"Unknown setting '{'.'.join((*keys, str(rest[0])))}'{where((*keys, rest[0]))}.{hint} Every valid key "
                f"is listed, with its default, in {DEFAULTS_FILE}.")
    if kind == "invalid_key":
        prefix = "".join(k + "." for k in keys)
        return (f"Setting names{where((*keys, rest[0])) or ' in the config'} are text; {prefix}{rest[0]!r} "
                f"is a {type(rest[0]).__name__}.")
    if kind == "missing":
        return f"Setting '{dotted}' is missing; {DEFAULTS_FILE} lists every setting with its default."
    value = _lookup(cfg, keys)
    default = _lookup(defaults or {}, keys)
    default = None if default is _MISSING else default
    shown = default is not None and not (isinstance(default, Mapping) and default)  # a filled section is not shown
    like = f" like the default {default!r}" if shown else ""
    if kind == "rule":
        return f"Setting '{dotted}' is {value!r}; {error['ctx']['text']}."
    choices = get_args(annotation) if kind == "literal_error" else ()
    if choices and len({type(c) for c in choices}) == 1 and type(value) is not type(choices[0]):
        kind = {int: "int_type", str: "string_type"}[type(choices[0])]  # e.g. true for data.channels
    type_name = {**_TYPE_NAMES, "model_type": "mapping"}.get(kind)
    if value is None:
        return (f"Setting '{dotted}'{where()} is null; it needs a value{' of type ' + type_name if type_name else ''}"
                f"{',' + like if like else ''} (only the settings documented as 'null: ...' in "
                f"{DEFAULTS_FILE} may be null).")
    if rest:  # one of several types (a Union): its description says which
        rule = field.description if field is not None else None
        return f"Setting '{dotted}' is {value!r}; it must be {rule or error['msg'].lower()}."
    if kind == "model_type":
        return f"Setting '{dotted}'{where()} must be a section (mapping), not {value!r}."
    if kind in _TYPE_NAMES:
        if type(None) in get_args(annotation) and default is None:  # a setting whose default is null
            expected = "text" if kind == "string_type" else "a number"
            return f"Setting '{dotted}' is {value!r}; it must be {expected} or null."
        return (f"Setting '{dotted}'{where()} is {value!r} ({type(value).__name__}); "
                f"it must be of type {type_name}{like}.")
    if kind == "literal_error":
        return f"Setting '{dotted}' is {value!r}; choose one of {', '.join(map(str, choices))}."
    if kind == "finite_number":
        return f"Setting '{dotted}' is {value!r}; it must be a number."
    if field is not None and kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"Setting '{dotted}' is {value!r}; {_number_rule(field)}."
    return f"Setting '{dotted}' is {value!r}: {error['msg']}."  # not expected: pydantic's own words


_MISSING = object()


def _lookup(node: Any, keys: Iterable[Any]) -> Any:
    for key in keys:
        node = node.get(key, _MISSING) if isinstance(node, Mapping) else _MISSING
    return node


def _walk_strings(node: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _walk_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_strings(value, f"{path}[{i}]")


def check(cfg: Mapping[str, Any], sources: Sequence[tuple[Mapping, str | None]] = (),
          defaults: Mapping[str, Any] | None = None) -> None:
    """``cfg`` (every setting, merged) against :class:`Settings`; the first problem is a :class:`ConfigError`.
    ``sources`` (each part merged into ``cfg``, and where it came from: a file, the command line) and ``defaults``
    only let the message say where a key was set and what its default is."""
    for where, text in _walk_strings(cfg):
        if "\0" in text:
            raise ConfigError(f"Setting '{where}' contains a NUL character; remove it.")
    try:
        Settings.model_validate(cfg)
    except ValidationError as exc:
        raise ConfigError(_message(exc.errors()[0], cfg, sources, defaults)) from None


def known_keys(cfg: Any, model: type[BaseModel] | None = Settings) -> Any:
    """``cfg`` without the keys :class:`Settings` does not know (``config_name``, or a setting an older version had)."""
    if not (isinstance(cfg, Mapping) and model):
        return cfg
    fields = _fields(model)
    return {key: known_keys(value, _model(fields[key].annotation)) for key, value in cfg.items() if key in fields}


