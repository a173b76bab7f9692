"""A real W&B sweep, online: W&B's server chooses the values, and one agent in this process trains each run.

With an API key and a reachable server (``make wandb-tune``), :func:`tune_online` creates a sweep from the
W&B sweep file with ``wandb.sweep`` (or joins ``--sweep-id``) and runs ``wandb.agent`` with a function that
trains one trial in-process, the data decoded once. More agents on more machines scale it out, as W&B
intends. Without them the same file runs locally with Optuna (:mod:`cxrtrack.tuning.sweep_format`). This is
the only tuning module that imports ``wandb`` (W&B's sweep server and agent have no tracker-level equivalent):
inside the functions that talk to the server, so deciding whether to go online costs no W&B import.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from cxrtrack.errors import ConfigError, CXRError
from cxrtrack.tuning.report import write_best_config
from cxrtrack.tuning.space import BaseConfig, StudySpec, check_spec, trial_values
from cxrtrack.tuning.sweep_format import load_spec

log = logging.getLogger(__name__)


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
            raise ConfigError("A W&B-server sweep needs W&B online: an API key (`.venv/bin/wandb login` or "
                              "WANDB_API_KEY) and no WANDB_MODE=offline. Without them, run the sweep locally: "
                              "drop --engine wandb / SWEEP_ID= (the default runs it with Optuna).")
        return True
    return mode == "online"


def tune_online(space: str | Path, base: BaseConfig, *, sweep_id: str | None, trials: int | None,
                required: bool) -> bool:
    """Run the sweep on the W&B server with one agent in this process; write the best config. Returns
    False (after saying why) when the server cannot be reached and the local sweep should run instead."""
    from cxrtrack.data.dataset import DataCache  # torch: imported once a sweep is really run
    from cxrtrack.tracking import build_tracker
    from cxrtrack.training.run import run_experiment

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
            raise CXRError(f"The W&B server did not accept the sweep ({type(exc).__name__}: {str(exc)[:300]}). "
                           f"Check the network and `wandb login`, "
                           f"or run the sweep locally without --engine wandb.") from None
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
