"""W&B sweeps: read a sweep file in W&B's own format, and run it either on the W&B server or locally.

The file (``configs/wandb/sweep.yaml``) is checked against W&B's sweep-config schema (the keys and
distributions of the ``sweeps`` package that W&B's server uses), so the same file works with
``wandb sweep`` unchanged, and a typo is one paragraph naming the key here rather than a rejection
by the server later.

- **Online** (an API key and a reachable server): :func:`run_online` creates a real sweep with
  ``wandb.sweep`` (or joins ``--sweep-id``) and runs ``wandb.agent`` with a function that trains one
  trial in-process. More agents on more machines scale it out, as W&B intends.
- **Offline** (the default here): W&B's sweep controller lives on its server, so :func:`parse_sweep`
  translates the file into a :class:`~cxrtrack.tuning.space.StudySpec` and Optuna runs it
  (``grid`` -> GridSampler, ``random`` -> RandomSampler, ``bayes`` -> Optuna's Gaussian-process
  sampler, or TPE with early termination, ``early_terminate: hyperband`` -> HyperbandPruner). Each trial is an offline W&B run
  grouped by the sweep's name.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from cxrtrack.errors import ConfigError, CXRError
from cxrtrack.tuning.space import (
    BaseConfig,
    Param,
    PrunerSpec,
    StudySpec,
    suggest_key,
)

log = logging.getLogger(__name__)

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
PARAM_KEYS = ("distribution", "values", "value", "probabilities", "min", "max", "q", "mu", "sigma", "a", "b", "parameters")
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
                                    f"({', '.join(k for k in spec if k != 'parameters')}); W&B allows only 'parameters' there.")
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
            raise _error(where, f"parameter '{key}' uses {dist}, which W&B's server accepts but the local (Optuna) sweep "
                                f"cannot run: {UNSUPPORTED_LOCALLY[dist]}.")
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
                params.append(Param(key, "float", low=round(first * q, 12), high=round(last * q, 12), step=q, source=dist))
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
        raise _error(where, f"method '{method}' is not one W&B defines (grid, random, bayes).{suggest_key(method, METHODS)}")
    metric = data.get("metric")
    if not isinstance(metric, dict) or "name" not in metric:
        raise _error(where, "a local sweep needs the metric to pick the best trial: add metric: {name: val/loss, "
                            "goal: minimize} (or val/acc, val/f1_macro with goal: maximize).")
    for key in metric:
        if key not in METRIC_KEYS:
            raise _error(where, f"unknown key '{key}' in metric.{suggest_key(key, METRIC_KEYS)} W&B knows: {', '.join(METRIC_KEYS)}.")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise _error(where, f"metric goal must be minimize or maximize, not '{goal}'.")
    notes = [f"'{k}' is for W&B's own agents and controller; the local sweep does not use it" for k in NOT_USED_LOCALLY if k in data]
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
        raise _error(where, f"early_terminate type must be hyperband (the only one W&B defines), not {raw.get('type')!r}.")
    eta = raw.get("eta", 3)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta <= 1:
        raise _error(where, f"early_terminate eta must be a number above 1, not {eta!r}.")
    if "min_iter" in raw:
        min_iter = raw["min_iter"]
        if isinstance(min_iter, bool) or not isinstance(min_iter, int) or min_iter < 1:
            raise _error(where, f"early_terminate min_iter must be a whole number >= 1, not {min_iter!r}.")
    elif "max_iter" in raw and "s" in raw:  # W&B: brackets at max_iter / eta^k, k = 1..s
        max_iter, s = raw["max_iter"], raw["s"]
        if not isinstance(max_iter, int) or max_iter < 1 or isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0:
            raise _error(where, f"early_terminate needs a whole max_iter >= 1 and s >= 0; got {max_iter!r}, {s!r}.")
        min_iter = max(1, int(max_iter / eta ** s))
    else:
        raise _error(where, "early_terminate (hyperband) needs min_iter, or max_iter together with s.")
    if "strict" in raw:
        notes.append("early_terminate.strict has no Optuna equivalent; HyperbandPruner's rule is used")
    if eta != int(eta):
        notes.append(f"early_terminate eta {eta} is rounded to {int(round(eta))} (Optuna's reduction_factor is an integer)")
    return PrunerSpec(type="hyperband", min_epochs=int(min_iter), reduction_factor=max(2, int(round(eta))))


# -- online: a real W&B sweep -------------------------------------------------------------------------


def sweep_params_from_env() -> dict[str, Any]:
    """The values W&B's agent chose for the current run: it writes them to ``$WANDB_SWEEP_PARAM_PATH``
    (``{name: {value: v}}``) before calling the agent function."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        raise CXRError("The W&B agent did not say which parameters to use (WANDB_SWEEP_PARAM_PATH is not set).")
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {k: v["value"] for k, v in data.items() if isinstance(v, dict) and "value" in v}


def run_online(spec: StudySpec, base: BaseConfig, *, sweep_id: str | None, count: int | None, train_trial,
               project: str, entity: str | None) -> str:
    """Create (or join) a W&B sweep and run one agent in this process; returns the sweep path.

    ``train_trial(values)`` trains one trial with the sampled values (dotted keys) and returns its
    metric; the W&B run it opens joins the sweep through the environment the agent sets.
    """
    import wandb

    if sweep_id is None:
        config = {**spec.source}
        config.setdefault("project", project)
        if entity:
            config.setdefault("entity", entity)
        sweep_id = wandb.sweep(config, project=config["project"], entity=config.get("entity"))  # on the W&B server
        log.info("W&B sweep %s created on the W&B server: add agents on other machines with "
                 "`make wandb-tune SWEEP_ID=%s`.", sweep_id, sweep_id)

    def trial() -> None:
        values = sweep_params_from_env()
        train_trial({k: v for k, v in values.items()})

    wandb.agent(sweep_id, function=trial, project=project, entity=entity, count=count)
    return sweep_id


def best_online_run(sweep_path: str, metric: str) -> tuple[dict[str, Any], float] | None:
    """The best finished run of an online sweep, as (its sampled parameters, its metric), via W&B's API."""
    import wandb

    sweep = wandb.Api().sweep(sweep_path)
    run = sweep.best_run()
    if run is None:
        return None
    names = {p for p in (sweep.config.get("parameters") or {})}
    return {k: v for k, v in run.config.items() if k in names}, run.summary.get(metric)


def online_requested(base: BaseConfig, engine: str, sweep_id: str | None) -> bool:
    """A W&B-server sweep when asked for (``--engine wandb``, ``--sweep-id``), or in ``auto`` when W&B
    would log online (an API key is configured and WANDB_MODE does not say otherwise)."""
    from cxrtrack.tracking.wandb_tracker import resolve_mode

    mode = resolve_mode(base.load()["tracking"]["wandb"].get("mode", "auto"))
    if engine == "wandb" or sweep_id:
        if mode != "online":
            raise ConfigError("A W&B-server sweep needs W&B online: an API key (`.venv/bin/wandb login` or WANDB_API_KEY) "
                              "and no WANDB_MODE=offline. Without them, run the sweep locally: drop --engine wandb / "
                              "SWEEP_ID= (the default runs it with Optuna).")
        return True
    return mode == "online"


def tune_online(space: str | Path, base: BaseConfig, *, sweep_id: str | None, trials: int | None,
                required: bool) -> bool:
    """Run the sweep on the W&B server with one agent in this process; write the best config. Returns
    False (after saying why) when the server cannot be reached and the local sweep should run instead."""
    from cxrtrack.data.dataset import DataCache
    from cxrtrack.tracking import build_tracker
    from cxrtrack.training.run import run_experiment
    from cxrtrack.tuning.report import write_best_config
    from cxrtrack.tuning.space import check_spec, load_spec, trial_values

    spec = load_spec(space)
    if spec.format != "wandb":
        raise ConfigError(f"{space} is not a W&B sweep file (it has 'params', not 'parameters'): a W&B-server sweep "
                          f"needs W&B's format, e.g. configs/wandb/sweep.yaml.")
    check_spec(spec, base)
    cfg = base.load()
    project = spec.source.get("project") or cfg["tracking"]["wandb"].get("project") or cfg["experiment"]
    entity = spec.source.get("entity") or cfg["tracking"]["wandb"].get("entity")
    study = spec.name or Path(space).stem
    cache = DataCache()  # decoded once for every run this agent trains
    better = min if spec.direction == "minimize" else max

    def train_trial(values: dict[str, Any]) -> None:
        name = f"trial-{os.environ.get('WANDB_RUN_ID', 'run')}"
        trial_cfg = base.load(trial_values(spec, cfg, study, name, values, "wandb"))
        group = build_tracker("wandb", trial_cfg)
        best: list[float] = []

        def summary_best(epoch: int, row: dict[str, float]) -> None:
            # The sweep reads the run's summary, which W&B sets to the last value: keep the best (the checkpoint's).
            best.append(better([*best, float(row[spec.metric])]))
            group.log_summary({spec.metric: best[-1]})

        run_experiment(trial_cfg, group, data=cache, callbacks=(summary_best,), job_type="trial")

    try:
        path = run_online(spec, base, sweep_id=sweep_id, count=trials or spec.trials, train_trial=train_trial,
                          project=project, entity=entity)
    except CXRError:
        raise
    except Exception as exc:  # noqa: BLE001 - the server refused or could not be reached
        if required:
            raise CXRError(f"The W&B server did not accept the sweep ({type(exc).__name__}: {str(exc)[:300]}). Check the "
                           f"network and `wandb login`, or run the sweep locally without --engine wandb.") from None
        log.warning("W&B server sweep unavailable (%s: %s): running the sweep locally with Optuna instead.",
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False
    if sweep_id is None:
        path = "/".join(x for x in (entity, project, path) if x)
    found = best_online_run(path, spec.metric)
    if found is None:
        print(f"W&B-server sweep {path}: no finished run yet.")
        return True
    values, value = found
    out = write_best_config(Path(cfg["output_dir"]) / "tune" / study / "best_config.yaml", base, spec, values,
                            "(W&B sweep best run)", study, "wandb", float(value))
    print(f"\nW&B-server sweep {path}: best {spec.metric} = {value} with {values}\nBest config: {out}\n"
          f"Train it in full:  make train-custom CONFIG={out} TRACKER=wandb")
    return True
