"""A tuning session end to end: what ``scripts/tune.py`` runs.

1. Read and check the search space (either format) against the base config.
2. Open (or create) the Optuna study; refuse to resume it with another space or tracker; fail trials
   whose process died and queue interrupted ones again.
3. Open the study-level MLflow parent run (created once, its id kept in the study, reopened on resume).
4. Run the trials: in this process (``workers=1``) or in N worker processes.
5. Write the trials table, the best config and Optuna's plots; log them to the MLflow parent run and to
   a W&B summary run; export and register the best trial's model (only that one); end the parent
   FINISHED, or KILLED on Ctrl-C (the study stays consistent: rerun to resume).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cxrtrack import signals
from cxrtrack.errors import ConfigError
from cxrtrack.tracking import FAILED, FINISHED, KILLED, TrackerGroup, build_tracker, tracker_names
from cxrtrack.tracking.base import RunInfo
from cxrtrack.tuning import report
from cxrtrack.tuning.optuna_search import (
    PARENT_WAIT_S,
    Launch,
    Tally,
    Worker,
    budget_of,
    check_resume,
    default_storage,
    open_storage,
    open_study,
    reconcile,
    run_workers,
    safe_url,
    sampler_name,
    tally,
)
from cxrtrack.tuning.space import BaseConfig, StudySpec, check_spec
from cxrtrack.tuning.sweep_format import load_spec

log = logging.getLogger(__name__)

_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class TuneResult:
    study: str
    storage: str
    status: str  # FINISHED | KILLED | FAILED
    metric: str
    tally: Tally
    budget: int
    out_dir: Path
    best: dict[str, Any] | None = None  # {"trial", "value", "values"}
    best_config: Path | None = None
    parent_run_id: str | None = None
    parent_where: str | None = None  # the parent run in words, with its MLflow UI link
    summary_run_dir: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)


def _epochs(spec: StudySpec, base: BaseConfig) -> int:
    """The most epochs any trial can run (the pruner's maximum resource)."""
    epochs = base.load(spec.fixed)["training"]["epochs"]
    for p in spec.params:
        if p.key == "training.epochs":
            epochs = max([epochs, *[int(v) for v in p.extremes()]])
    return int(epochs)


def tune(space: str | Path, base: BaseConfig, tracker: str = "mlflow", *, study: str | None = None,
         storage: str | None = None, trials: int | None = None, workers: int = 1) -> TuneResult:
    spec = load_spec(space)
    check_spec(spec, base)
    for note in spec.notes:
        log.info("Note: %s.", note)
    cfg = base.load()
    names = tracker_names(tracker)
    name = study or spec.name or Path(space).stem
    if not _STUDY_NAME.match(str(name)):
        raise ConfigError(f"Study name {name!r} must be 1-100 letters, digits, '_', '-' or '.', starting with a letter "
                          f"or digit (STUDY=, --study, or 'name' in the search space).")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"WORKERS must be a positive whole number, not {workers!r}.")
    storage = storage or default_storage(cfg)
    launch = Launch(spec, base, str(name), storage, tracker, budget_of(spec, trials), seed=int(cfg["seed"]),
                    epochs=_epochs(spec, base))
    study_obj, created = open_study(launch, open_storage(storage), create=True)
    check_resume(study_obj, launch)
    reconcile(study_obj, launch)
    before = tally(study_obj.get_trials(deepcopy=False))
    out_dir = Path(cfg["output_dir"]) / "tune" / launch.study
    out_dir.mkdir(parents=True, exist_ok=True)
    to_run = max(0, launch.budget - before.claimed) + before.waiting
    log.info("Study '%s' (%s, %s sampler, metric %s %s, pruner %s) in %s: %s; "
             "budget %d trials, %d to run with %d worker%s.",
             launch.study, "new" if created else "resumed", sampler_name(spec), spec.metric, spec.direction,
             spec.pruner.type,
             safe_url(storage), _describe(before), launch.budget, to_run, workers, "s" if workers > 1 else "")
    parent = _open_parent(study_obj, launch, created, cfg, space) if "mlflow" in names else None
    if parent is not None:
        launch.parents = {"mlflow": parent.trackers[0].run_ref()["run_id"]}
    cache = None
    status = FINISHED
    started = datetime.now()
    try:
        if to_run:
            from cxrtrack.data.dataset import resolve_data_path

            resolve_data_path(cfg["data"])  # generates the synthetic set if needed, once, before any worker starts
            if workers == 1:
                from cxrtrack.data.dataset import DataCache

                cache = DataCache()
                with signals.sigterm_as_interrupt():  # SIGTERM (kill, CI, a scheduler) ends the trial like Ctrl-C
                    Worker(launch, 0, cache).run()
            else:
                run_workers(launch, workers, out_dir)
    except KeyboardInterrupt:
        status = KILLED
    except BaseException:
        if parent is not None:
            _finish(study_obj, launch, parent, [], out_dir, FAILED, cfg, cache, space, started)
        raise
    result = _finish(study_obj, launch, parent, names, out_dir, status, cfg, cache, space, started)
    return result


def shortfall(t: Tally, budget: int, target_reached: Any) -> str | None:
    """The warning for a study that finished short of its budget: fewer trials done than the budget, none queued or
    running anywhere, no target reached. Skipped trials take no slot and interrupted ones are queued again, so
    this is a trial lost (as a race between workers once lost one), never a normal ending; None otherwise."""
    if target_reached is not None or t.waiting or t.running or t.done >= budget:
        return None
    return (f"The study finished with {t.done} of its budget of {budget} trials done, none queued or running and no "
            f"target reached ({_describe(t)}): {budget - t.done} trial(s) of the budget were never trained. "
            f"The trials table (trials.csv) shows which; running the same command again runs the missing ones "
            f"unless they were grid points, which this study counts as visited.")


def _describe(t: Tally) -> str:
    if not (t.done or t.running or t.waiting or t.interrupted):
        return "no trials yet"
    parts = [f"{t.complete} complete", f"{t.pruned} pruned", f"{t.failed} failed"]
    parts += [f"{n} {what}" for n, what in ((t.interrupted, "interrupted"), (t.running, "running"),
                                             (t.waiting, "queued"), (t.skipped, "skipped")) if n]
    return ", ".join(parts)


# -- the study-level runs -----------------------------------------------------------------------------


def _study_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The trackers' settings for a study-level run: no system metrics (they belong to the trials)."""
    out = copy.deepcopy(cfg)
    out["tracking"]["mlflow"]["system_metrics"] = False
    return out


def _space_params(spec: StudySpec, launch: Launch) -> dict[str, Any]:
    return {"study": {"name": launch.study, "method": spec.method, "metric": spec.metric, "direction": spec.direction,
                      "pruner": spec.pruner.type, "format": spec.format},
            "space": {**{p.key: f"{p.source}: {p.describe()}" for p in spec.params},
                      **{k: f"fixed: {v}" for k, v in spec.fixed.items()}}}


def _study_tags(launch: Launch, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"study": launch.study, "optuna_storage": safe_url(launch.storage), "budget": str(launch.budget),
            "engine": "optuna (local)", **(extra or {})}


def _open_parent(study, launch: Launch, created: bool, cfg: dict[str, Any], space) -> TrackerGroup:
    """The MLflow parent run: created by the session that created the study (its id stored in the study);
    other sessions and workers, here or elsewhere, reopen and nest under the same one."""
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id is None and not created and not study.get_trials(deepcopy=False):
        deadline = time.monotonic() + PARENT_WAIT_S  # the creator is about to record it
        while parent_id is None and time.monotonic() < deadline:
            time.sleep(1)
            parent_id = study.user_attrs.get("mlflow_parent_run_id")
    group = build_tracker("mlflow", _study_cfg(cfg))
    spec = launch.spec
    info = RunInfo(name=launch.study, config=_space_params(spec, launch) if parent_id is None else {},
                   tags=_study_tags(launch), job_type="study", resume={"mlflow": parent_id} if parent_id else {},
                   description=f"Tuning study '{launch.study}': {spec.method} search of {len(spec.params)} parameters "
                               f"for the best {spec.metric}; one nested run per trial.")
    group.start_run(info)
    if parent_id is None:
        study.set_user_attr("mlflow_parent_run_id", group.trackers[0].run_ref()["run_id"])
    group.log_artifact(Path(space), "study")
    log.info("MLflow parent run %s%s.", group.trackers[0].run_ref()["run_id"], " (reopened)" if parent_id else "")
    return group


def _finish(study, launch: Launch, parent: TrackerGroup | None, names: list[str], out_dir: Path, status: str,
            cfg: dict[str, Any], cache, space, started: datetime) -> TuneResult:
    spec = launch.spec
    trials = study.get_trials(deepcopy=False)
    t = tally(trials)
    rows = report.trial_rows(trials, spec)
    files = {"study/trials.csv": report.write_csv(rows, out_dir / "trials.csv")}
    best = report.best_trial(trials, spec.direction)
    short = shortfall(t, launch.budget, study.user_attrs.get("target_reached")) if status == FINISHED else None
    if short:
        log.warning("%s", short)
    result = TuneResult(launch.study, launch.storage, status, spec.metric, t, launch.budget, out_dir, rows=rows,
                        stats=report.overhead_stats(trials, since=started))
    if best is not None:
        result.best = {"trial": best.number, "value": best.value,
                       "values": best.user_attrs.get("values") or dict(best.params)}
        result.best_config = report.write_best_config(out_dir / "best_config.yaml", launch.base, spec,
                                                      result.best["values"], str(best.number), launch.study,
                                                      launch.tracker, best.value)
        files["study/best_config.yaml"] = result.best_config
    if status == FINISHED:
        result.plots = report.make_plots(study, out_dir / "plots")
    summary: dict[str, float] = {"trials_complete": t.complete, "trials_pruned": t.pruned,
                                 "trials_failed": t.failed, "trials_interrupted": t.interrupted}
    if best is not None:
        summary.update(best_value=float(best.value), best_trial=best.number)
    if result.stats.get("overhead_median") is not None:
        summary["overhead_median"] = result.stats["overhead_median"]
    best_tags = {f"best.{k}": str(v) for k, v in (result.best or {}).get("values", {}).items()}
    if parent is not None:
        result.parent_run_id = parent.trackers[0].run_ref()["run_id"]
        result.parent_where = parent.describe()
        _log_study(parent, rows, result, files, summary, best_tags, launch)
        if status == FINISHED and best is not None and cfg["tracking"]["log_model"] \
                and study.user_attrs.get("registered_trial") != best.number:
            errors = sum(parent.errors.values())
            _log_best_model(parent, best, launch, cfg, cache)
            if sum(parent.errors.values()) == errors:
                study.set_user_attr("registered_trial", best.number)
        parent.end_run(status)
    if "wandb" in names and status == FINISHED:
        result.summary_run_dir = _wandb_summary(rows, result, files, summary, best_tags, launch, cfg, best, cache)
    return result


def _log_study(group: TrackerGroup, rows, result: TuneResult, files: dict[str, Path], summary, best_tags, launch):
    group.set_tags({**_study_tags(launch), "trials": _describe(result.tally), **best_tags,
                    **({"best.trial": str(result.best["trial"])} if result.best else {})})
    group.log_summary(summary)
    group.log_table("study/trials", [{k: report._plain(v) for k, v in r.items()} for r in rows])
    for name, path in files.items():
        group.log_artifact(path, str(Path(name).parent))
    for name, path in result.plots.items():
        group.log_image(path, f"study/{name}")


def _log_best_model(group: TrackerGroup, best, launch: Launch, cfg: dict[str, Any], cache) -> None:
    """Export the best trial's checkpoint (the only model a study logs), registered as ``cfg`` says
    (``tracking.register``, see :mod:`cxrtrack.tracking.registry`): never tested, so it never takes ``champion``."""
    import numpy as np

    from cxrtrack.data.dataset import DataCache
    from cxrtrack.provenance import git_info
    from cxrtrack.tracking import registry
    from cxrtrack.training.evaluate import load_checkpoint

    checkpoint = best.user_attrs.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        log.warning("The best trial's checkpoint %s is not on this machine: its model is not registered here "
                    "(it is an artifact of the trial's run).", checkpoint)
        return
    model, ckpt = load_checkpoint(checkpoint)
    # a CV trial's checkpoint is its fold ensemble
    epoch = ckpt.get("epoch", (ckpt.get("cv") or {}).get("chosen_epoch"))
    data_cfg = ckpt["config"]["data"]
    data = (cache or DataCache()).get(data_cfg, ckpt["config"]["seed"])
    loader = data.loaders(2, 0, 0)["val"]  # an input example only: shapes and values the model takes
    assert loader is not None  # data built by the cache always has a validation split
    example = next(iter(loader))[0][:2].numpy().astype(np.float32)
    metadata = registry.model_metadata(
        cfg, {"study": launch.study, "trial": best.number, "image_size": data.image_size,
              launch.spec.metric: float(best.value), **({"best_epoch": epoch} if epoch is not None else {})},
        source=data.source, fingerprint=data.fingerprint,
        run_name=ckpt.get("run_name") or Path(checkpoint).parents[1].name,
        git_commit=git_info().get("git_commit", "unknown"), test_metrics={})
    errors = sum(group.errors.values())
    group.log_model(model, Path(checkpoint), example, metadata)
    plan = metadata[registry.REGISTRY_KEY]
    if sum(group.errors.values()) > errors:  # the tracker said why; the upload waits in the spool (or is lost)
        log.warning("The best trial's model (trial %d) did not reach every store: see the tracker's message above.",
                    best.number)
        return
    log.info("%s the best trial's model (trial %d, %s = %.4f)%s.", "Registered" if plan["register"] else "Logged",
             best.number, launch.spec.metric, best.value,
             "" if plan["register"] else f", not registered: {plan['reason']}")


def _wandb_summary(rows, result: TuneResult, files, summary, best_tags, launch: Launch, cfg, best, cache) -> str | None:
    """A W&B run holding the study: trials table, best config, plots, the best model (offline W&B has no
    parent runs: the trials and this run share the group = the study name)."""
    group = build_tracker("wandb", _study_cfg(cfg))
    info = RunInfo(name=f"{launch.study}-summary", config={**_space_params(launch.spec, launch),
                                                            "best": (result.best or {}).get("values", {})},
                   tags=_study_tags(launch, {"local_sweep": "true"}), group=launch.study, job_type="summary",
                   description=f"Local (Optuna) sweep '{launch.study}', not a W&B-server sweep: summary of its trials.")
    with group:
        group.start_run(info)
        _log_study(group, rows, result, files, summary, best_tags, launch)
        if best is not None and cfg["tracking"]["log_model"]:
            _log_best_model(group, best, launch, cfg, cache)
    return (group.trackers[0].run_ref() or {}).get("run_dir")


def print_result(result: TuneResult, tracker: str, local_sweep: bool) -> None:
    """The closing lines a user reads: counts, the best trial, where things are, how to train the winner."""
    t = result.tally
    lines = ["", f"Study '{result.study}' {'interrupted' if result.status == KILLED else result.status.lower()}: "
             f"{_describe(t)} (budget {result.budget}). Optuna storage: {safe_url(result.storage)}"]
    if local_sweep:
        lines.append("This was a LOCAL sweep run by Optuna on this machine, not a W&B-server sweep: its trials are "
                     f"offline W&B runs grouped as '{result.study}' (upload them with `make wandb-sync`).")
    if result.best:
        values = ", ".join(f"{k}={v}" for k, v in result.best["values"].items())
        lines.append(f"Best trial {result.best['trial']}: {result.metric} = {result.best['value']:.4f} with {values}")
    if result.stats.get("overhead_median") is not None:
        tpm = result.stats.get("trials_per_minute")
        lines.append("Per-trial overhead (trial wall time / training loop): "
                     f"median {result.stats['overhead_median']:.3f} over {result.stats['trials_measured']} trials"
                     + (f"; {tpm:.2f} trials/minute this session" if tpm else ""))
    lines.append(f"Trials table, plots and best config: {result.out_dir}")
    if result.parent_run_id:
        lines.append("The study's MLflow parent run (every trial nested under it): "
                     f"{result.parent_where or result.parent_run_id}")
    if result.summary_run_dir:
        lines.append(f"W&B summary run: {result.summary_run_dir}")
    if result.status == KILLED:
        lines.append("Interrupted: the current trial is marked KILLED and queued again. "
                     "Rerun the same command to resume.")
    if result.best_config:
        where = report._rel(result.best_config)
        lines += ["", f"Best config: {where}",
                  "Train it in full (evaluated on the test split; registered if the data is real, as "
                  "tracking.register: auto decides):",
                  f"  make train-custom CONFIG={where} TRACKER={tracker}",
                  f"  .venv/bin/python scripts/train.py --config {where} --tracker {tracker}"]
    print("\n".join(lines), flush=True)
