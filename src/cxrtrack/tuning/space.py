"""What a study searches: the parameters, the metric, the budget, the sampler and the pruner.

One :class:`StudySpec` serves both front ends. It is read either from this project's own YAML format
(``configs/mlflow/hyperparameters.yaml``, :func:`parse_space`) or from a W&B sweep file
(``configs/wandb/sweep.yaml``, :mod:`cxrtrack.tuning.sweep_format`, whose ``load_spec`` reads either); Optuna
then runs it.

Parameters are dotted config keys (``training.lr``, ``data.augment.rotation``): each trial is the
base config with the sampled values set, checked by the same :func:`cxrtrack.config.load_config` as
any run, so a search space can only produce configs that ``scripts/train.py`` would accept. Every
bound and choice is checked that way when the space is loaded, before any trial runs.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrtrack.config import load_config, with_values
from cxrtrack.errors import ConfigError

METHODS = ("grid", "random", "tpe", "gp")
PRUNERS = ("none", "median", "hyperband")
# validation metrics only: a trial is selected on validation data, never on the test split
METRIC_DIRECTIONS = {"val/loss": "minimize", "val/acc": "maximize", "val/f1_macro": "maximize"}
# keys the tuner sets itself for every trial (see optuna_search.trial_values)
RESERVED = ("tracking", "output_dir", "run_name", "experiment", "evaluation", "training.monitor",
            "training.monitor_mode", "device", "config_name")


@dataclass
class Param:
    """One searched config key. ``kind``: categorical | float | int."""

    key: str
    kind: str
    choices: list[Any] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    source: str = ""  # how the user wrote it (W&B distribution name or ours), for messages and the parent run

    # Optuna's categorical choices must be None/bool/int/float/str: lists (e.g. model.dropout_conv) are
    # stored as their JSON text and decoded when the trial's config is built.
    def _encoded(self) -> list[Any]:
        return [json.dumps(c) if isinstance(c, (list, dict)) else c for c in self.choices]

    def bounds(self) -> tuple[float, float]:
        """(low, high) of a numeric parameter; a categorical one has none."""
        if self.low is None or self.high is None:
            raise ValueError(f"parameter '{self.key}' ({self.kind}) has no range")
        return self.low, self.high

    def decode(self, value: Any) -> Any:
        if (self.kind == "categorical" and isinstance(value, str)
                and any(isinstance(c, (list, dict)) for c in self.choices)):
            for choice, encoded in zip(self.choices, self._encoded(), strict=True):
                if encoded == value:
                    return choice
        return value

    def suggest(self, trial) -> Any:
        """The value Optuna's sampler draws for this trial (decoded to the config's type)."""
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.key, self._encoded()))
        low, high = self.bounds()
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, low, high, step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        if self.kind == "categorical":
            return self._encoded()
        if self.log:
            raise ConfigError(f"Parameter '{self.key}' is log-scaled ({self.source}); a grid search needs a list of "
                              f"values for it, e.g. values: [0.0001, 0.001, 0.01].")
        low, high = self.bounds()
        if self.kind == "int":
            return list(range(int(low), int(high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(f"Parameter '{self.key}' is continuous ({self.source}); a grid search needs a list of "
                              f"values for it, or a step (q for W&B's q_uniform).")
        n = int(math.floor((high - low) / self.step + 1e-9))
        return [round(low + i * self.step, 12) for i in range(n + 1)]

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {self.choices}"
        scale = "log-uniform" if self.log else "uniform"
        kind = "integer " if self.kind == "int" else ""
        step = f" step {self.step}" if self.step else ""
        return f"{kind}{scale} [{self.low}, {self.high}]{step}"

    def checked_values(self, most: int = 1000) -> list[Any]:
        """The values whose validity implies every draw's: all of them when they are few (choices, or integers and
        steps in a short range: a setting may take only some, like data.channels), else the two bounds (a setting's
        numeric range is an interval)."""
        if self.kind == "categorical":
            return list(self.choices)
        low, high = self.bounds()
        if not self.log and (self.kind == "int" or self.step) and (high - low) / (self.step or 1) < most:
            return self.grid_values()
        return self.extremes()

    def extremes(self) -> list[Any]:
        """The choices, or the two bounds."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(bound) for bound in self.bounds()]


@dataclass
class PrunerSpec:
    type: str = "none"  # none | median | hyperband
    startup_trials: int = 2  # median: trials that finish before any pruning
    warmup_epochs: int = 2  # median: epochs of every trial that are never pruned
    min_epochs: int = 1  # hyperband: the smallest budget (epochs) a trial gets
    reduction_factor: int = 3  # hyperband: keep 1/reduction_factor of the trials at each rung


@dataclass
class StudySpec:
    """Everything a study needs besides the base config, from either YAML format."""

    params: list[Param]
    method: str = "tpe"
    metric: str = "val/loss"
    direction: str = "minimize"
    trials: int | None = None  # the budget: trials that end complete, pruned or failed (interrupted ones are retried)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    fixed: dict[str, Any] = field(default_factory=dict)  # keys every trial sets to one value
    name: str | None = None
    startup_trials: int | None = None  # tpe/gp: random trials before the model is used (None: a third of the budget)
    target: float | None = None  # stop once a trial reaches this value (W&B's metric.target)
    format: str = "optuna"  # "optuna" (configs/mlflow/hyperparameters.yaml) or "wandb" (a W&B sweep file)
    source: dict[str, Any] = field(default_factory=dict)  # the file as written
    path: str = ""
    notes: list[str] = field(default_factory=list)  # settings accepted but not used by the local engine

    def param(self, key: str) -> Param:
        return next(p for p in self.params if p.key == key)

    def grid(self) -> dict[str, list[Any]]:
        return {p.key: p.grid_values() for p in self.params}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def identity(self) -> dict[str, Any]:
        """What must not change when a study is resumed (the budget may): kept in the study."""
        return {"method": self.method, "metric": self.metric, "direction": self.direction,
                "params": [asdict(p) for p in self.params], "fixed": self.fixed, "pruner": asdict(self.pruner)}

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> StudySpec:
        data = json.loads(text)
        data["params"] = [Param(**p) for p in data["params"]]
        data["pruner"] = PrunerSpec(**data["pruner"])
        return cls(**data)


@dataclass
class BaseConfig:
    """The config every trial starts from: a file plus overrides, as ``scripts/train.py`` takes them."""

    path: str
    overrides: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def load(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        return load_config(self.path, self.overrides, {**self.values, **(values or {})})


# -- checks shared by both formats ---------------------------------------------------------------


def suggest_key(word: str, known) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_spec(spec: StudySpec, base: BaseConfig) -> None:
    """Every key, bound and choice must make a config that training accepts; the metric must be a
    validation metric whose direction matches. Raises one :class:`ConfigError` paragraph naming the key."""
    where = spec.path or "the search space"
    if spec.metric not in METRIC_DIRECTIONS:
        hint = " The test split is never used to choose a trial." if spec.metric.startswith("test") else ""
        raise ConfigError(
            f"{where}: the metric '{spec.metric}' is not a validation metric the trainer reports.{hint} "
            f"Choose one of {', '.join(METRIC_DIRECTIONS)}.{suggest_key(spec.metric, METRIC_DIRECTIONS)}")
    if spec.direction != METRIC_DIRECTIONS[spec.metric]:
        raise ConfigError(
            f"{where}: {spec.metric} is better when it is "
            f"{'lower' if METRIC_DIRECTIONS[spec.metric] == 'minimize' else 'higher'}: "
            f"set the direction (goal) to {METRIC_DIRECTIONS[spec.metric]}, not {spec.direction}.")
    if not spec.params:
        raise ConfigError(f"{where}: no parameter is searched; add at least one under the parameters.")
    if spec.trials is not None and (not isinstance(spec.trials, int) or spec.trials < 1):
        raise ConfigError(f"{where}: the trial budget must be a positive integer, not {spec.trials!r}.")
    try:
        base_cfg = base.load()
    except ConfigError as exc:
        raise ConfigError(f"The base config of the study is invalid: {exc}") from None
    # Every value a trial can get goes through the checks of scripts/train.py (cxrtrack.settings), before any trial.
    if base_cfg["training"]["seeds"] > 1 or any(p.key == "training.seeds" for p in spec.params) \
            or "training.seeds" in spec.fixed:
        raise ConfigError(
            f"{where}: a study compares trials by one validation number each; training.seeds (SEEDS=) is for measuring "
            f"a finished config. Set training.seeds=1 in the base config and remove it from the space; to make trials "
            f"less noisy, cross-validate them instead (training.cv_folds: 5 in the base config or the space).")
    for key in [p.key for p in spec.params] + list(spec.fixed):
        if any(key == r or key.startswith(r + ".") for r in RESERVED):
            raise ConfigError(
                f"{where}: '{key}' cannot be searched: the tuner sets it for every trial (trackers, output folders, "
                f"the test split stays unused, the monitored metric is the study's metric). Remove it from the space.")
    fixed = dict(spec.fixed)
    _check_values(base_cfg, where, "", fixed)
    for p in spec.params:
        if p.kind in ("float", "int"):
            if p.low is None or p.high is None or not p.low < p.high:
                raise ConfigError(f"{where}: parameter '{p.key}' ({p.source}) needs a lower bound below its upper "
                                  f"bound; got {p.low!r} and {p.high!r}.")
            if p.log and p.low <= 0:
                raise ConfigError(f"{where}: parameter '{p.key}' is log-scaled ({p.source}), so its lower bound must "
                                  f"be above 0, not {p.low!r}.")
            if p.step is not None and (p.step <= 0 or p.step > p.high - p.low):
                raise ConfigError(f"{where}: parameter '{p.key}' has step {p.step!r}; it must be above 0 and at most "
                                  f"the range {p.high - p.low!r}.")
        elif not p.choices:
            raise ConfigError(f"{where}: parameter '{p.key}' has an empty list of values; give at least one.")
        for value in p.checked_values():
            _check_values(base_cfg, where, f"parameter '{p.key}' ({p.source}) ", {**fixed, p.key: value})
    if spec.method == "grid":
        spec.grid()  # raises for a continuous parameter


def _check_values(base_cfg: dict[str, Any], where: str, what: str, values: dict[str, Any]) -> None:
    try:
        with_values(base_cfg, values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {what}gives a config that training would refuse: {exc}") from None


# -- this project's format -----------------------------------------------------------------------

TOP_KEYS = ("name", "description", "method", "metric", "direction", "trials", "startup_trials", "pruner", "params")
DISTRIBUTIONS = ("categorical", "uniform", "log_uniform", "int_uniform", "int_log_uniform")
PARAM_KEYS = ("distribution", "values", "value", "low", "high", "step")
PRUNER_KEYS = ("type", "startup_trials", "warmup_epochs", "min_epochs", "reduction_factor")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Search space file {path} does not exist: pass SPACE=<file> (the shipped ones are "
                          f"configs/mlflow/hyperparameters.yaml and configs/wandb/sweep.yaml).") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Search space file {path} is not valid YAML ({exc}). "
                          "Fix the syntax and run again.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Search space file {path} must hold a mapping at the top level "
                          "(method, metric, parameters).")
    return data


def _number(value: Any, where: str, key: str, what: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {what} of parameter '{key}' must be a number, not {value!r}.")
    return value


def _unknown(where: str, what: str, key: str, known) -> ConfigError:
    return ConfigError(f"{where}: unknown key '{key}' {what}.{suggest_key(key, known)} Known keys: {', '.join(known)}.")


def parse_param(key: str, raw: Any, where: str) -> Param | tuple[str, Any]:
    """One entry of ``params``: a list (categorical), a single value (fixed), or a mapping with a
    ``distribution``. Returns a :class:`Param`, or ``("fixed", value)``."""
    if isinstance(raw, list):
        return Param(key, "categorical", choices=list(raw), source="values")
    if not isinstance(raw, dict):
        return ("fixed", raw)
    if raw and not any(k in PARAM_KEYS for k in raw):
        first = next(iter(raw))
        raise ConfigError(f"{where}: parameter '{key}' is a section ({', '.join(map(str, raw))}); "
                          f"name each searched key in full instead, e.g. {key}.{first}: [...] "
                          f"(dotted keys of configs/default.yaml).")
    for k in raw:
        if k not in PARAM_KEYS:
            raise _unknown(where, f"in parameter '{key}'", k, PARAM_KEYS)
    if "value" in raw:
        return ("fixed", raw["value"])
    dist = raw.get("distribution", "categorical" if "values" in raw else None)
    if dist is None:
        raise ConfigError(f"{where}: parameter '{key}' needs values: [...] or a distribution "
                          f"({', '.join(DISTRIBUTIONS)}) with low and high.")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: parameter '{key}' has distribution '{dist}', which is not one of "
                          f"{', '.join(DISTRIBUTIONS)}.{suggest_key(dist, DISTRIBUTIONS)}")
    if dist == "categorical":
        if not isinstance(raw.get("values"), list):
            raise ConfigError(f"{where}: parameter '{key}' is categorical: give its choices as values: [a, b, ...].")
        return Param(key, "categorical", choices=list(raw["values"]), source="categorical")
    for bound in ("low", "high"):
        if bound not in raw:
            raise ConfigError(f"{where}: parameter '{key}' ({dist}) needs '{bound}'.")
    low, high = (_number(raw[b], where, key, b) for b in ("low", "high"))
    step = _number(raw["step"], where, key, "step") if raw.get("step") is not None else None
    if dist.startswith("int"):
        for name, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and value != int(value):
                raise ConfigError(f"{where}: parameter '{key}' is an integer ({dist}): its {name} must be a whole "
                                  f"number, not {value!r}.")
        return Param(key, "int", low=int(low), high=int(high), log=dist == "int_log_uniform",
                     step=int(step) if step else None, source=dist)
    if dist == "log_uniform" and step is not None:
        raise ConfigError(f"{where}: parameter '{key}' is log_uniform; Optuna cannot combine a log scale with a step: "
                          f"drop 'step' or give a list of values.")
    return Param(key, "float", low=float(low), high=float(high), log=dist == "log_uniform", step=step, source=dist)


def parse_space(data: dict[str, Any], path: str = "") -> StudySpec:
    """This project's format (see configs/mlflow/hyperparameters.yaml)."""
    where = path or "the search space"
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(where, "at the top level", key, TOP_KEYS)
    method = str(data.get("method", "tpe"))
    if method not in METHODS:
        raise ConfigError(f"{where}: method '{method}' is not one of {', '.join(METHODS)}."
                          f"{suggest_key(method, METHODS)}")
    metric = str(data.get("metric", "val/loss"))
    direction = str(data.get("direction", METRIC_DIRECTIONS.get(metric, "minimize")))
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"{where}: direction must be minimize or maximize, not '{direction}'.")
    pruner = _parse_pruner(data.get("pruner", "none"), where)
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise ConfigError(f"{where}: 'params' must map config keys (e.g. training.lr) to values or distributions.")
    params, fixed = [], {}
    for key, raw in raw_params.items():
        parsed = parse_param(str(key), raw, where)
        if isinstance(parsed, Param):
            params.append(parsed)
        else:
            fixed[str(key)] = parsed[1]
    trials = data.get("trials")
    startup = data.get("startup_trials")
    if startup is not None and (not isinstance(startup, int) or startup < 0):
        raise ConfigError(f"{where}: startup_trials must be a whole number >= 0, not {startup!r}.")
    return StudySpec(params=params, method=method, metric=metric, direction=direction, trials=trials, pruner=pruner,
                     fixed=fixed, name=data.get("name"), startup_trials=startup, format="optuna", source=data,
                     path=str(path))


def _parse_pruner(raw: Any, where: str) -> PrunerSpec:
    if raw is None or isinstance(raw, str):
        raw = {"type": raw or "none"}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: pruner must be none, median, hyperband or a mapping with a type.")
    for key in raw:
        if key not in PRUNER_KEYS:
            raise _unknown(where, "in pruner", key, PRUNER_KEYS)
    kind = str(raw.get("type", "none"))
    if kind not in PRUNERS:
        raise ConfigError(f"{where}: pruner type '{kind}' is not one of {', '.join(PRUNERS)}."
                          f"{suggest_key(kind, PRUNERS)}")
    spec = PrunerSpec(type=kind)
    for key in PRUNER_KEYS[1:]:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "reduction_factor" else 0):
                raise ConfigError(f"{where}: pruner {key} must be a whole number (at least "
                                  f"{2 if key == 'reduction_factor' else 0}), not {value!r}.")
            setattr(spec, key, value)
    return spec


def trial_values(spec: StudySpec, base_cfg: dict[str, Any], study: str, run_name: str, sampled: dict[str, Any],
                 tracker: str, extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The dotted values a trial sets on the base config: the space's fixed and sampled values, plus what
    the tuner decides for every trial (its own run folder, no test split, no model export, the study's
    metric monitored so the checkpoint kept is the one scored, the tracker, tags naming the study)."""
    return {
        **spec.fixed,
        **sampled,
        "run_name": run_name,
        "output_dir": str(Path(base_cfg["output_dir"]) / "tune" / study),
        "evaluation.run_test": False,
        "tracking.log_model": False,
        "tracking.tracker": tracker,
        "training.monitor": spec.metric,
        "training.monitor_mode": "min" if spec.direction == "minimize" else "max",
        "tracking.tags": {**base_cfg["tracking"]["tags"], "study": study, **(extra_tags or {})},
    }
