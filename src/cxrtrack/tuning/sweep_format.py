"""W&B's sweep-file format, read into the :class:`~cxrtrack.tuning.space.StudySpec` that Optuna runs.

The file (``configs/wandb/sweep.yaml``) is checked against W&B's sweep-config schema (the keys and
distributions of the ``sweeps`` package that W&B's server uses), so the same file works with
``wandb sweep`` unchanged, and a typo is one paragraph naming the key here rather than a rejection
by the server later. W&B's sweep controller lives on its server, so locally :func:`parse_sweep`
translates the file for Optuna (``grid`` -> GridSampler, ``random`` -> RandomSampler, ``bayes`` -> Optuna's
Gaussian-process sampler, or TPE with early termination, ``early_terminate: hyperband`` -> HyperbandPruner).
Pure parsing: no W&B client here (the online runner is :mod:`cxrtrack.tuning.wandb_sweep`).

:func:`load_spec` reads a search-space file in either format (this one, or the project's own in
:mod:`cxrtrack.tuning.space`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from cxrtrack.errors import ConfigError
from cxrtrack.tuning.space import (
    Param,
    PrunerSpec,
    StudySpec,
    parse_space,
    read_yaml_mapping,
    suggest_key,
)

# From W&B's sweep-config schema (sweeps/config/schema.json): every top-level key it accepts.
TOP_KEYS = ("method", "metric", "parameters", "early_terminate", "run_cap", "name", "description", "program",
            "command", "project", "entity", "controller", "scheduler", "job", "image_uri", "apiVersion", "kind",
            "metrics")
NOT_USED_LOCALLY = ("program", "command", "controller", "scheduler", "job", "image_uri", "apiVersion", "kind")
METHODS = {"grid": "grid", "random": "random", "bayes": "gp"}
METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")
HYPERBAND_KEYS = ("type", "min_iter", "max_iter", "s", "eta", "strict")
# distribution -> the keys W&B allows beside it (each schema has additionalProperties: false)
DISTRIBUTIONS = {
    "constant": ("value",), "categorical": ("values",), "categorical_w_probabilities": ("values", "probabilities"),
    "int_uniform": ("min", "max"), "uniform": ("min", "max"), "q_uniform": ("min", "max", "q"),
    "log_uniform": ("min", "max"), "log_uniform_values": ("min", "max"),
    "inv_log_uniform": ("min", "max"), "inv_log_uniform_values": ("min", "max"),
    "q_log_uniform": ("min", "max", "q"), "q_log_uniform_values": ("min", "max", "q"),
    "normal": ("mu", "sigma"), "q_normal": ("mu", "sigma", "q"), "log_normal": ("mu", "sigma"),
    "q_log_normal": ("mu", "sigma", "q"), "beta": ("a", "b"), "q_beta": ("a", "b", "q"),
}
PARAM_KEYS = ("distribution", "values", "value", "probabilities", "min", "max", "q", "mu", "sigma", "a", "b",
              "parameters")
# Valid W&B, but Optuna's samplers draw from bounded uniform / log-uniform ranges or lists only.
UNSUPPORTED_LOCALLY = {
    "categorical_w_probabilities": "Optuna's samplers have no weighted choices; drop 'probabilities'",
    "q_log_uniform": "Optuna cannot combine a log scale with a step; use log_uniform_values or a list of values",
    "q_log_uniform_values": "Optuna cannot combine a log scale with a step; use log_uniform_values or a list of values",
    "normal": "Optuna samples bounded ranges only; use uniform with min and max",
    "q_normal": "Optuna samples bounded ranges only; use q_uniform with min and max",
    "log_normal": "Optuna samples bounded ranges only; use log_uniform_values with min and max",
    "q_log_normal": "Optuna samples bounded ranges only; use log_uniform_values or a list of values",
    "beta": "Optuna samples bounded uniform ranges only; use uniform with min and max",
    "q_beta": "Optuna samples bounded uniform ranges only; use q_uniform with min and max",
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _error(where: str, text: str) -> ConfigError:
    return ConfigError(f"{where}: {text}")


def _num(value: Any, where: str, key: str, field: str, integer: bool = False) -> float:
    if isinstance(value, str):
        try:
            float(value)
            raise _error(where, f"'{field}' of parameter '{key}' is the text {value!r}: YAML reads a number like 1e-4 "
                                f"(without a dot) as text, and W&B would reject it too. Write 1.0e-4 or 0.0001.")
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(where, f"'{field}' of parameter '{key}' must be a number, not {value!r}.")
    if integer and not isinstance(value, int):
        raise _error(where, f"parameter '{key}' is int_uniform, so '{field}' must be a whole number, not {value!r} "
                            f"(for real numbers write distribution: uniform).")
    return value


def _params(raw: Any, where: str, prefix: str = "") -> tuple[list[Param], dict[str, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise _error(where, f"'{prefix.rstrip('.') or 'parameters'}' must map parameter names to their settings "
                            f"(values, value, or distribution with min and max).")
    params, fixed = [], {}
    for name, spec in raw.items():
        key = f"{prefix}{name}"
        if not _NAME.match(str(name)):
            raise _error(where, f"parameter name '{key}' is not allowed by W&B (letters, digits, _ . - only).")
        if not isinstance(spec, dict):
            raise _error(where, f"parameter '{key}' must be a mapping such as {{values: [...]}} or {{value: x}}, "
                                f"not {spec!r} (W&B requires the mapping even for one value).")
        for k in spec:
            if k not in PARAM_KEYS:
                raise _error(where, f"unknown key '{k}' in parameter '{key}'.{suggest_key(k, PARAM_KEYS)} "
                                    f"W&B knows: {', '.join(PARAM_KEYS)}.")
        if "parameters" in spec:  # a nested section: its parameters are sub-keys
            if len(spec) > 1:
                raise _error(where, f"parameter '{key}' has 'parameters' (a nested section) beside other keys "
                                    f"({', '.join(k for k in spec if k != 'parameters')}); "
                                    "W&B allows only 'parameters' there.")
            sub_params, sub_fixed = _params(spec["parameters"], where, key + ".")
            params += sub_params
            fixed.update(sub_fixed)
            continue
        dist = spec.get("distribution")
        if dist is None:  # W&B infers it
            if "value" in spec:
                dist = "constant"
            elif "values" in spec:
                dist = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
            elif "min" in spec and "max" in spec:
                both_int = all(isinstance(spec[b], int) and not isinstance(spec[b], bool) for b in ("min", "max"))
                dist = "int_uniform" if both_int else "uniform"
            else:
                raise _error(where, f"parameter '{key}' needs 'values', 'value', or 'min' and 'max' "
                                    f"(with an optional distribution).")
        if dist not in DISTRIBUTIONS:
            raise _error(where, f"parameter '{key}' has distribution '{dist}', which W&B does not define."
                                f"{suggest_key(dist, DISTRIBUTIONS)} W&B's distributions: {', '.join(DISTRIBUTIONS)}.")
        allowed = DISTRIBUTIONS[dist]
        for k in spec:
            if k not in (*allowed, "distribution"):
                raise _error(where, f"parameter '{key}' ({dist}) cannot have '{k}': W&B allows only "
                                    f"{', '.join(allowed)} with that distribution.")
        for k in allowed:
            if k not in spec and dist not in ("normal", "log_normal", "q_normal", "q_log_normal", "beta", "q_beta"):
                raise _error(where, f"parameter '{key}' ({dist}) needs '{k}'.")
        if dist in UNSUPPORTED_LOCALLY:
            raise _error(where, f"parameter '{key}' uses {dist}, which W&B's server accepts but the local (Optuna) "
                                f"sweep cannot run: {UNSUPPORTED_LOCALLY[dist]}.")
        if dist == "constant":
            fixed[key] = spec["value"]
            continue
        if dist == "categorical":
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise _error(where, f"parameter '{key}': 'values' must be a non-empty list.")
            params.append(Param(key, "categorical", choices=list(spec["values"]), source="values"))
            continue
        integer = dist == "int_uniform"
        low, high = (_num(spec[b], where, key, b, integer) for b in ("min", "max"))
        if not low < high:
            raise _error(where, f"parameter '{key}' ({dist}) needs min below max; got min {low!r}, max {high!r}.")
        if dist == "int_uniform":
            params.append(Param(key, "int", low=int(low), high=int(high), source=dist))
        elif dist == "uniform":
            params.append(Param(key, "float", low=float(low), high=float(high), source=dist))
        elif dist == "q_uniform":
            q = _num(spec["q"], where, key, "q")
            if q <= 0:
                raise _error(where, f"parameter '{key}' (q_uniform) needs q above 0, not {q!r}.")
            # W&B draws round(uniform(min, max) / q) * q: the multiples of q in [min, max]
            first, last = math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9)
            if last <= first:
                raise _error(where, f"parameter '{key}' (q_uniform): fewer than two multiples of q={q!r} lie in "
                                    f"[{low!r}, {high!r}]; widen the range or make q smaller.")
            if isinstance(q, int) and isinstance(low, int) and isinstance(high, int):
                params.append(Param(key, "int", low=first * q, high=last * q, step=q, source=dist))
            else:
                params.append(Param(key, "float", low=round(first * q, 12), high=round(last * q, 12), step=q,
                                    source=dist))
        else:  # the log-uniform family: all are log-uniform over a range of values
            if dist == "log_uniform":  # min and max are natural-log exponents
                low, high = math.exp(low), math.exp(high)
            elif dist == "inv_log_uniform":  # 1 / exp(uniform(min, max))
                low, high = math.exp(-high), math.exp(-low)
            elif low <= 0:
                raise _error(where, f"parameter '{key}' ({dist}) needs min above 0 (a log scale), not {low!r}.")
            params.append(Param(key, "float", low=float(low), high=float(high), log=True, source=dist))
    return params, fixed


def parse_sweep(data: dict[str, Any], path: str = "") -> StudySpec:
    """A W&B sweep config -> the Optuna study that runs it locally. Unknown keys, distributions W&B does
    not define and bad bounds are a :class:`ConfigError` naming the key."""
    where = path or "the sweep config"
    for key in data:
        if key not in TOP_KEYS:
            raise _error(where, f"unknown key '{key}' at the top level of the sweep.{suggest_key(key, TOP_KEYS)} "
                                f"W&B's sweep keys: {', '.join(TOP_KEYS)}.")
    method = data.get("method")
    if method is None:
        raise _error(where, "W&B requires 'method': grid, random or bayes.")
    if method == "custom" or "metrics" in data:
        raise _error(where, "multi-objective sweeps (method: custom, metrics:) cannot run locally; use one 'metric'.")
    if method not in METHODS:
        raise _error(where, f"method '{method}' is not one W&B defines (grid, random, bayes)."
                            f"{suggest_key(method, METHODS)}")
    metric = data.get("metric")
    if not isinstance(metric, dict) or "name" not in metric:
        raise _error(where, "a local sweep needs the metric to pick the best trial: add metric: {name: val/loss, "
                            "goal: minimize} (or val/acc, val/f1_macro with goal: maximize).")
    for key in metric:
        if key not in METRIC_KEYS:
            raise _error(where, f"unknown key '{key}' in metric.{suggest_key(key, METRIC_KEYS)} "
                                f"W&B knows: {', '.join(METRIC_KEYS)}.")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise _error(where, f"metric goal must be minimize or maximize, not '{goal}'.")
    notes = [f"'{k}' is for W&B's own agents and controller; the local sweep does not use it"
             for k in NOT_USED_LOCALLY if k in data]
    for key in ("impute", "impute_while_running"):
        if key in metric:
            notes.append(f"metric.{key} has no Optuna equivalent (a failed trial is simply not modelled)")
    target = metric.get("target")
    if target is not None:
        target = _num(target, where, "metric", "target")
    run_cap = data.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise _error(where, f"run_cap must be a positive whole number, not {run_cap!r}.")
    pruner = _hyperband(data.get("early_terminate"), where, notes)
    params, fixed = _params(data.get("parameters"), where)
    return StudySpec(params=params, method=METHODS[method], metric=str(metric["name"]), direction=goal, trials=run_cap,
                     pruner=pruner, fixed=fixed, name=data.get("name"), target=target, format="wandb", source=data,
                     path=str(path), notes=notes)


def _hyperband(raw: Any, where: str, notes: list[str]) -> PrunerSpec:
    if raw is None:
        return PrunerSpec()
    if not isinstance(raw, dict):
        raise _error(where, "early_terminate must be a mapping: {type: hyperband, min_iter: 3}.")
    for key in raw:
        if key not in HYPERBAND_KEYS:
            raise _error(where, f"unknown key '{key}' in early_terminate.{suggest_key(key, HYPERBAND_KEYS)} "
                                f"W&B knows: {', '.join(HYPERBAND_KEYS)}.")
    if raw.get("type") != "hyperband":
        raise _error(where, "early_terminate type must be hyperband (the only one W&B defines), "
                            f"not {raw.get('type')!r}.")
    eta = raw.get("eta", 3)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta <= 1:
        raise _error(where, f"early_terminate eta must be a number above 1, not {eta!r}.")
    if "min_iter" in raw:
        min_iter = raw["min_iter"]
        if isinstance(min_iter, bool) or not isinstance(min_iter, int) or min_iter < 1:
            raise _error(where, f"early_terminate min_iter must be a whole number >= 1, not {min_iter!r}.")
    elif "max_iter" in raw and "s" in raw:  # W&B: brackets at max_iter / eta^k, k = 1..s
        max_iter, s = raw["max_iter"], raw["s"]
        if (not isinstance(max_iter, int) or max_iter < 1
                or isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0):
            raise _error(where, f"early_terminate needs a whole max_iter >= 1 and s >= 0; got {max_iter!r}, {s!r}.")
        min_iter = max(1, int(max_iter / eta ** s))
    else:
        raise _error(where, "early_terminate (hyperband) needs min_iter, or max_iter together with s.")
    if "strict" in raw:
        notes.append("early_terminate.strict has no Optuna equivalent; HyperbandPruner's rule is used")
    if eta != int(eta):
        notes.append(f"early_terminate eta {eta} is rounded to {int(round(eta))} "
                     "(Optuna's reduction_factor is an integer)")
    return PrunerSpec(type="hyperband", min_epochs=int(min_iter), reduction_factor=max(2, int(round(eta))))


def load_spec(path: str | Path) -> StudySpec:
    """Read a search-space file in either format: W&B's (``parameters:``) or this project's (``params:``)."""
    data = read_yaml_mapping(path)
    wandb_like = ("parameters" in data or isinstance(data.get("metric"), dict) or data.get("method") == "bayes"
                  or any(k in data for k in ("run_cap", "early_terminate", "program", "command")))
    if "params" not in data and wandb_like:
        return parse_sweep(data, str(path))
    return parse_space(data, str(path))
