"""What a study leaves behind: the trials table, the best config as a normal config file, Optuna's plots,
and the per-trial overhead (trial wall time / training-loop time) and throughput of the session.

Everything is written to ``outputs/tune/<study>/`` first; the study-level runs (the MLflow parent
run, the W&B summary run) then receive the same files through the ordinary tracker calls.
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cxrtrack.config import flatten, load_config, unflatten
from cxrtrack.tuning.optuna_search import tally, trial_kind
from cxrtrack.tuning.space import BaseConfig, StudySpec, trial_values

log = logging.getLogger(__name__)

# Settings of the search, not of the winner: training the best config in full tests it and registers it as the
# default policy says (tracking.register: auto), whatever the (quick) tuning base config set for its trials.
_NOT_IN_BEST = ("config_name", "run_name", "tracking.tracker", "tracking.tags", "evaluation.run_test",
                "tracking.log_model", "tracking.register")


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def trial_rows(trials, spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, sampled values, epochs, timings, error, retry links."""
    retried = tally(trials).retried
    rows = []
    for t in trials:
        values = (t.user_attrs.get("values")
                  or {p.key: p.decode(t.params[p.key]) for p in spec.params if p.key in t.params})
        wall = ((t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None)
        fit = t.user_attrs.get("fit_s")
        runs = t.user_attrs.get("runs") or {}
        rows.append({
            "trial": t.number,
            "state": trial_kind(t, retried),
            spec.metric: t.value,
            **{k: _plain(values.get(k)) for k in (p.key for p in spec.params)},
            "epochs": t.user_attrs.get("epochs"),
            "best_epoch": t.user_attrs.get("best_epoch"),
            "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
            "wall_s": round(wall, 2) if wall is not None else None,
            "fit_s": round(fit, 2) if fit else None,
            "overhead": round(wall / fit, 3) if wall and fit else None,
            "retry_of": t.user_attrs.get("retry_of"),
            "error": t.user_attrs.get("error") or t.user_attrs.get("skipped"),
            "mlflow_run_id": (runs.get("mlflow") or {}).get("run_id"),
            "wandb_run_dir": (runs.get("wandb") or {}).get("run_dir"),
        })
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial", "state"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def best_trial(trials, direction: str):
    complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        return None
    return (min if direction == "minimize" else max)(
        complete, key=lambda t: (t.value, t.number) if direction == "minimize" else (t.value, -t.number))


def root_config(path: str | Path) -> Path:
    """The default.yaml at the end of a config's ``extends:`` chain."""
    path = Path(path).expanduser().resolve()
    for _ in range(20):
        parent = (yaml.safe_load(path.read_text()) or {}).get("extends")
        if parent is None:
            return path
        path = (path.parent / Path(parent).expanduser()).resolve()
    return path


def write_best_config(path: Path, base: BaseConfig, spec: StudySpec, values: dict[str, Any], label: str, study: str,
                      tracker: str, metric_value: float) -> Path:
    """The winning settings as a normal config that extends default.yaml: only the keys that differ from it."""
    base_cfg = base.load()
    trial_cfg = base.load(trial_values(spec, base_cfg, study, "best", values, tracker))
    default = root_config(base.path)
    default_cfg = load_config(default)
    flat, flat_default = flatten(trial_cfg), flatten(default_cfg)
    changed = {k: v for k, v in flat.items()
               if flat_default.get(k) != v and not any(k == n or k.startswith(n + ".") for n in _NOT_IN_BEST)}
    changed.pop("output_dir", None)
    if flatten(base_cfg).get("output_dir") != flat_default.get("output_dir"):
        changed["output_dir"] = base_cfg["output_dir"]
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best trial {label} of study '{study}': {spec.metric} = {metric_value:.6g} "
              f"({spec.direction}), written {datetime.now():%Y-%m-%d %H:%M}.\n"
              f"# A normal config: train it in full with\n"
              f"#   make train-custom CONFIG={_rel(path)} TRACKER={tracker}\n")
    body = {"extends": os.path.relpath(default, path.parent.resolve()), **unflatten(changed)}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    load_config(path)  # it must load like any config (it would be a bug here if not)
    return path


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def make_plots(study, out_dir: Path) -> dict[str, Path]:
    """Optuna's plots (matplotlib backend) as PNGs; a plot that cannot be drawn yet (e.g. importances
    need two completed trials) is skipped with the reason logged."""
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna.visualization.matplotlib as ovm

    import cxrtrack.training.plots  # noqa: F401 - selects the Agg backend before pyplot is imported

    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Callable[[Any], Any]] = {
        "optimization_history.png": ovm.plot_optimization_history,
        "param_importances.png": ovm.plot_param_importances,
        "parallel_coordinate.png": ovm.plot_parallel_coordinate,
        "slice.png": ovm.plot_slice,
        "intermediate_values.png": ovm.plot_intermediate_values,
    }
    written = {}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # Optuna's axis warnings on tiny studies (one value of a parameter)
                warnings.simplefilter("ignore")
                axes = plot(study)
            fig = np.asarray(axes).flat[0].figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig.tight_layout()
            fig.savefig(out_dir / name, dpi=100)
            written[name] = out_dir / name
        except Exception as exc:  # noqa: BLE001 - a plot Optuna cannot draw yet is not an error of the study
            log.info("Plot %s skipped: %s", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            plt.close("all")
    return written


def overhead_stats(trials, since: datetime | None = None) -> dict[str, float | int | None]:
    """Median trial wall time / training-loop time (finished trials), and trials per minute since ``since``."""
    ratios = []
    for t in trials:
        fit = t.user_attrs.get("fit_s")
        if t.state.name in ("COMPLETE", "PRUNED") and fit and t.datetime_start and t.datetime_complete:
            ratios.append((t.datetime_complete - t.datetime_start).total_seconds() / fit)
    out: dict[str, float | int | None] = {"overhead_median": round(statistics.median(ratios), 3) if ratios else None,
                                          "overhead_max": round(max(ratios), 3) if ratios else None,
                                          "trials_measured": len(ratios)}
    if since is not None:
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.datetime_complete
                    and t.datetime_complete >= since]
        if finished:
            span = (max(t.datetime_complete for t in finished) - since).total_seconds()
            out["session_trials"] = len(finished)
            out["session_minutes"] = round(span / 60, 3)
            out["trials_per_minute"] = round(len(finished) / (span / 60), 3) if span > 0 else None
    return out
