"""The one search engine behind ``make mlflow-tune`` and ``make wandb-tune``: an Optuna study.

- **Storage**: an Optuna RDB storage, SQLite beside the MLflow store by default (``optuna.db``), or
  any database URL (``postgresql://...``) that many workers on many machines share. Heartbeats mark a
  trial whose process died as failed and queue it again (Optuna's ``RetryHeartbeatStaleTrialCallback``).
- **Trials**: each trial is :func:`~cxrtrack.training.run.run_experiment` in the worker's process, with
  the worker's :class:`~cxrtrack.data.dataset.DataCache` (images decoded once per worker), the test
  split unused and no model export; the per-epoch validation metric goes to Optuna's pruner through
  a trainer callback, which stops a pruned trial with :class:`StopTraining` (the run ends FINISHED and
  tagged ``trial_state=PRUNED``; the Optuna trial ends PRUNED).
- **Budget**: ``trials`` counts trials that end complete, pruned or failed; a trial interrupted by
  Ctrl-C or by its process dying is marked failed in Optuna, KILLED in the tracker, and queued again,
  so a rerun of the same study name resumes it and never repeats a finished trial.
- **Workers**: ``workers=1`` runs trials in this process; ``workers=N`` starts N worker processes on
  the same study (``python -m cxrtrack.tuning.optuna_search --worker``). The MLflow parent run's id is
  kept in the study, so every worker, here or on another machine, nests its trials under it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxrtrack.errors import ConfigError, CXRError
from cxrtrack.provenance import scrub_secrets
from cxrtrack.tracking import KILLED, TrackerGroup, build_tracker
from cxrtrack.tracking.base import RunInfo
from cxrtrack.tuning.space import BaseConfig, StudySpec, trial_values

log = logging.getLogger(__name__)

HEARTBEAT_S = 5  # a running trial writes a heartbeat this often...
GRACE_S = 20  # ...and is failed and queued again when it has not for this long (its process died)
MAX_RETRIES = 3  # an interrupted trial is queued again at most this often
MAX_CONSECUTIVE_FAILURES = 3  # a worker stops after this many trials in a row fail with an error
PARENT_WAIT_S = 120  # a worker joining a new study waits this long for the first one to record the parent run


class _NoTracebackForInterrupts(logging.Filter):
    """Optuna logs every failed trial with its traceback; for Ctrl-C and skipped trials that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, _Skip)):
            record.exc_info, record.exc_text = None, None
        return True


def _optuna():
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*RetryFailedTrialCallback.*")
    optuna.logging.disable_default_handler()  # Optuna's messages go through our logging set-up
    optuna.logging.enable_propagation()
    logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs failed trials (filters do not inherit)
    if not any(isinstance(f, _NoTracebackForInterrupts) for f in logger.filters):
        logger.addFilter(_NoTracebackForInterrupts())
    return optuna


# -- storage ------------------------------------------------------------------------------------------


def default_storage(cfg: dict[str, Any]) -> str:
    """``sqlite:///<folder of the MLflow SQLite store>/optuna.db``; ``./optuna.db`` for any other store."""
    from cxrtrack.tracking.mlflow_tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg["tracking"]["mlflow"].get("tracking_uri"))
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def safe_url(url: str) -> str:
    return scrub_secrets(url)


def open_storage(url: str):
    _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # several worker processes share the file
    elif url.startswith("postgresql"):
        kwargs = {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
        except Exception as exc:  # noqa: BLE001
            # Workers starting at once on a new database race to create Optuna's tables: one wins, the others
            # see a duplicate key (IntegrityError) or, on PostgreSQL, a table that "already exists"
            # (DuplicateTable); opening again then finds the tables.
            if attempt == 2 or not _creation_race(exc):
                raise _storage_error(url, exc) from None
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _creation_race(exc: Exception) -> bool:
    text = type(exc).__name__ + " " + str(exc)
    return any(mark in text for mark in ("IntegrityError", "DuplicateTable", "UniqueViolation", "already exists"))


def _storage_error(url: str, exc: Exception) -> ConfigError:
    if isinstance(exc, ImportError):
        return ConfigError(f"The Optuna storage {safe_url(url)} needs a database driver that is not installed ({exc}). "
                           f"PostgreSQL needs psycopg (`make install` installs psycopg[binary]).")
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"Could not open the Optuna storage {safe_url(url)} ({type(exc).__name__}: {first}). Check "
                       f"STORAGE= (e.g. postgresql://user:password@host:5432/dbname; the database must exist and be "
                       f"reachable), or leave it unset for a local SQLite file.")


# -- sampler, pruner ----------------------------------------------------------------------------------


def sampler_name(spec: StudySpec) -> str:
    """The sampler a study really uses, for the line that announces it (said once, not per worker)."""
    if spec.method == "gp" and spec.pruner.type != "none":
        # Optuna's GP sampler models completed trials only: it does not see pruned ones and proposes the same
        # point again and again (seen here: 5 identical trials). TPE models pruned trials by their last value,
        # like W&B's bayes imputes early-terminated runs.
        return "TPE (asked for a Gaussian process, which ignores pruned trials and would propose them again)"
    return {"gp": "Gaussian-process", "tpe": "TPE"}.get(spec.method, spec.method)


def make_sampler(spec: StudySpec, seed: int, worker_seed: int, budget: int):
    optuna = _optuna()
    startup = spec.startup_trials if spec.startup_trials is not None else min(10, max(2, budget // 3))
    if spec.method == "grid":
        # the same seed in every worker: GridSampler numbers the grid points by it
        return optuna.samplers.GridSampler(spec.grid(), seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=worker_seed)
    if spec.method == "gp" and spec.pruner.type == "none":
        return optuna.samplers.GPSampler(seed=worker_seed, n_startup_trials=startup)
    # gp with a pruner runs on TPE too (sampler_name says why);
    # constant_liar: parallel workers treat each other's running trials as bad, so they spread out
    return optuna.samplers.TPESampler(seed=worker_seed, n_startup_trials=startup, constant_liar=True)


def make_pruner(spec: StudySpec, epochs: int):
    optuna = _optuna()
    p = spec.pruner
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=max(epochs, p.min_epochs + 1),
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


# -- counting trials ----------------------------------------------------------------------------------


@dataclass
class Tally:
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # failed with an error (counts toward the budget)
    interrupted: int = 0  # Ctrl-C or a dead process: queued again, not counted
    skipped: int = 0  # created by a worker after the budget was already taken (never trained)
    running: int = 0
    waiting: int = 0
    retried: set[int] = field(default_factory=set)

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def claimed(self) -> int:
        return self.done + self.running + self.waiting


def trial_kind(t, retried: set[int]) -> str:
    """COMPLETE | PRUNED | FAILED | INTERRUPTED | SKIPPED | RUNNING | WAITING."""
    state = t.state.name
    if state == "FAIL":
        if t.user_attrs.get("skipped"):
            return "SKIPPED"
        if t.number in retried or t.user_attrs.get("interrupted"):
            return "INTERRUPTED"
        return "FAILED"
    return state


def tally(trials) -> Tally:
    out = Tally()
    out.retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        kind = trial_kind(t, out.retried)
        attr = {"COMPLETE": "complete", "PRUNED": "pruned", "FAILED": "failed", "INTERRUPTED": "interrupted",
                "SKIPPED": "skipped", "RUNNING": "running", "WAITING": "waiting"}[kind]
        setattr(out, attr, getattr(out, attr) + 1)
    return out


def budget_of(spec: StudySpec, trials: int | None) -> int:
    budget = trials if trials is not None else spec.trials
    if spec.method == "grid":
        size = spec.grid_size()
        if budget is None or budget > size:
            if budget is not None:
                log.info("The grid has %d points: the budget of %d trials is capped at %d.", size, budget, size)
            budget = size
    if budget is None:
        key = "run_cap" if spec.format == "wandb" else "trials"
        raise ConfigError(f"{spec.path or 'The search space'} sets no trial budget: add {key}: <n> to it, or pass "
                          f"TRIALS=<n> (--trials).")
    if budget < 1:
        raise ConfigError(f"The trial budget must be at least 1, not {budget}.")
    return budget


def surplus(me, trials, budget: int, grid_size: int | None = None) -> bool:
    """True for the trial ``me`` (a FrozenTrial, at the start of its objective) when the trials ahead of it already
    took what it was created for: the budget or, in a grid search of ``grid_size`` points, its grid point. Such a
    trial ends at once, untrained, marked skipped.

    Two workers can ask for a trial at the same moment: both see one trial of the budget left, or GridSampler hands
    both the same point (it writes a trial's point just after creating the trial, so the other worker may not see
    it yet). Judged against each other, both skipped and the point was lost (seen: two processes trained 3 of a
    4-point grid and exited 0). So a trial counts only the trials ahead of it: those created before it (the storage
    numbers trials in order), those that already passed this check (their sampled ``values`` are written) and queued
    retries, never a later trial still deciding: two trials never skip over each other. A retry of a trial that had
    passed this check (Optuna's heartbeat retry copies its ``values``), or a trial queued with fixed parameters,
    always runs. The race left trains a point twice, never loses one: a later trial that looked before an earlier
    one's point was written, and passed this check before the earlier one looked (milliseconds)."""
    if "fixed_params" in me.system_attrs or ("retry_history" in me.system_attrs and "values" in me.user_attrs):
        return False
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    ahead = [t for t in trials if t.number != me.number and trial_kind(t, retried) not in ("INTERRUPTED", "SKIPPED")
             and (t.number < me.number or t.state.name == "WAITING" or "values" in t.user_attrs)]
    if grid_size is None:
        return len(ahead) >= budget
    points = [t.system_attrs.get("grid_id") for t in ahead]
    if me.system_attrs.get("grid_id") in points:
        return True
    # a free point is surplus only when the budget is smaller than the grid and already taken
    return budget < grid_size and len({p for p in points if p is not None}) + points.count(None) >= budget


# -- the study ----------------------------------------------------------------------------------------


@dataclass
class Launch:
    """Everything a worker needs, written to ``launch.json`` for worker processes."""

    spec: StudySpec
    base: BaseConfig
    study: str
    storage: str
    tracker: str
    budget: int
    parents: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    epochs: int = 1

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"] = json.loads(self.spec.to_json())
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Launch:
        data = json.loads(text)
        data["spec"] = StudySpec.from_json(json.dumps(data["spec"]))
        data["base"] = BaseConfig(**data["base"])
        return cls(**data)


def open_study(launch: Launch, storage, *, create: bool, worker_seed: int = 0):
    """Create the study (``create``) or load it; returns (study, created). Creating is atomic in the
    database (the study name is unique), so of several workers starting at once exactly one creates it."""
    optuna = _optuna()
    sampler = make_sampler(launch.spec, launch.seed, worker_seed, launch.budget)
    pruner = make_pruner(launch.spec, launch.epochs)
    if create:
        try:
            study = optuna.create_study(study_name=launch.study, storage=storage, sampler=sampler, pruner=pruner,
                                        direction=launch.spec.direction)
            study.set_user_attr("spec", launch.spec.identity())
            study.set_user_attr("tracker", launch.tracker)
            study.set_user_attr("format", launch.spec.format)
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    study = optuna.load_study(study_name=launch.study, storage=storage, sampler=sampler, pruner=pruner)
    return study, False


def check_resume(study, launch: Launch) -> None:
    """A resumed study must search the same space for the same metric with the same tracker."""
    attrs = study.user_attrs
    stored = attrs.get("spec")
    if stored is None:
        return  # created by another tool, or a worker that has not written it yet
    if json.loads(json.dumps(stored)) != json.loads(json.dumps(launch.spec.identity())):
        raise ConfigError(
            f"Study '{launch.study}' in {safe_url(launch.storage)} was started with a different search space, method, "
            f"metric or pruner than {launch.spec.path or 'this one'}. A study keeps one space so its trials compare: "
            f"pick a new name with STUDY=<name> (--study), or restore the space it was started with.")
    if attrs.get("tracker") not in (None, launch.tracker):
        raise ConfigError(
            f"Study '{launch.study}' was started with tracker '{attrs['tracker']}', not '{launch.tracker}': resume it "
            f"with the same tracker (make {attrs['tracker']}-tune) or pick a new name with STUDY=<name>.")


def reconcile(study, launch: Launch) -> None:
    """Before a session: fail trials whose process died (heartbeat too old) and queue them again, queue
    interrupted trials that were not queued yet, and close tracker runs such trials left RUNNING."""
    optuna = _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    t = tally(trials)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for trial in trials:
        if trial.state.name != "FAIL":
            continue
        if trial.user_attrs.get("interrupted") and trial.number not in t.retried:
            retry(study, trial)
            log.info("Trial %d was interrupted: queued again.", trial.number)
        mlflow_run = (trial.user_attrs.get("runs") or {}).get("mlflow") or {}
        if mlflow_run.get("run_id"):  # (a finished trial's attributes cannot be changed: checked every session)
            from cxrtrack.tracking.mlflow_tracker import close_run

            try:
                if close_run(mlflow_run["tracking_uri"], mlflow_run["run_id"], KILLED):
                    log.info("Trial %d's MLflow run %s was left RUNNING by a process that died: marked KILLED.",
                             trial.number, mlflow_run["run_id"])
            except Exception as exc:  # noqa: BLE001 - a tracker problem must not stop the study
                log.warning("Could not check trial %d's MLflow run (%s: %s).", trial.number, type(exc).__name__, exc)


# -- a worker -----------------------------------------------------------------------------------------


class _TrialTrackers(TrackerGroup):
    """The trial's tracker group; records each backend's run reference in the Optuna trial as soon as
    the runs start, so a run left open by a process that dies can be found and closed later."""

    def __init__(self, group: TrackerGroup, on_start: Callable[[dict[str, Any]], None]):
        super().__init__(group.trackers, group.max_errors)
        self._on_start = on_start

    def start_run(self, run: RunInfo) -> None:
        super().start_run(run)
        self._on_start({t.name: t.run_ref() for t in self.trackers})


# What one attempt at a trial records; a retry starts without the retried attempt's (``interrupted`` would make a
# retry that fails count as interrupted, and be queued once more).
ATTEMPT_ATTRS = ("interrupted", "error", "runs", "run_dir", "fit_s", "run_s", "epochs", "checkpoint", "best_epoch",
                 "pruned_at_epoch")


class _Skip(Exception):  # noqa: N818
    """A trial created after the budget was taken by other workers: ended at once, never trained."""


class Worker:
    """Runs trials of one study in this process until the budget is taken."""

    def __init__(self, launch: Launch, index: int = 0, cache=None):
        from cxrtrack.data.dataset import DataCache

        self.launch = launch
        self.index = index
        self.cache = cache if cache is not None else DataCache()  # the images are decoded once per worker
        self.current = None  # the Optuna trial being run
        self.consecutive_failures = 0

    def run(self) -> None:
        optuna = _optuna()
        storage = open_storage(self.launch.storage)
        seed = zlib.crc32(f"{self.launch.seed}-{self.index}-{time.time_ns()}".encode())
        study, _ = open_study(self.launch, storage, create=False, worker_seed=seed)
        if self._finished(study):
            return
        try:
            study.optimize(self.objective, callbacks=[self._after_trial], catch=(Exception,), gc_after_trial=False)
        except KeyboardInterrupt:
            self._requeue_interrupted(study, optuna)
            raise
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            last = study.get_trials(deepcopy=False)[-1].user_attrs.get("error", "see the log above")
            raise CXRError(f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed (last: {last}); stopped this worker. "
                           f"Fix the cause and rerun the same command: the study resumes where it stopped.")

    def _finished(self, study) -> bool:
        t = tally(study.get_trials(deepcopy=False))
        return t.waiting == 0 and t.claimed >= self.launch.budget

    def _after_trial(self, study, frozen) -> None:
        kind = trial_kind(frozen, set())
        self.consecutive_failures = self.consecutive_failures + 1 if kind == "FAILED" else 0
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES or self._finished(study):
            study.stop()
        target = self.launch.spec.target
        if target is not None and frozen.value is not None:
            reached = frozen.value <= target if self.launch.spec.direction == "minimize" else frozen.value >= target
            if reached:
                log.info("Trial %d reached the target %s = %s: stopping the study.", frozen.number,
                         self.launch.spec.metric, target)
                study.set_user_attr("target_reached", frozen.number)
                study.stop()
        if study.user_attrs.get("target_reached") is not None:
            study.stop()

    def _requeue_interrupted(self, study, optuna) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        if self.current is None:
            return
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == self.current.number)
        if frozen.state.name == "FAIL" and frozen.user_attrs.get("interrupted"):
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(study, frozen)
            log.warning("Trial %d interrupted: it is marked failed in the study and KILLED in the tracker, and queued "
                        "again for the next run of this study.", frozen.number)

    def objective(self, trial) -> float:
        optuna = _optuna()
        from cxrtrack.training.run import run_experiment
        from cxrtrack.training.trainer import StopTraining

        self.current = trial
        launch, spec = self.launch, self.launch.spec
        trials = trial.study.get_trials(deepcopy=False)
        me = next(t for t in trials if t.number == trial.number)
        if surplus(me, trials, launch.budget, spec.grid_size() if spec.method == "grid" else None):
            trial.set_user_attr("skipped", "the budget or this grid point was already taken by other trials; "
                                           "not trained")
            trial.study.stop()
            raise _Skip(f"trial {trial.number} not needed: the budget of {launch.budget} trials or its grid point "
                        f"is taken")
        sampled = {p.key: p.suggest(trial) for p in spec.params}
        trial.set_user_attr("values", sampled)
        trial.set_user_attr("worker", self.index)
        retry_of = me.system_attrs.get("retry_history")
        if retry_of:
            trial.set_user_attr("retry_of", retry_of[0])
            for key in ATTEMPT_ATTRS:  # Optuna copied the retried attempt's: they are not this attempt's
                if me.user_attrs.get(key) is not None:
                    trial.set_user_attr(key, None)
        base_cfg = launch.base.load()
        name = f"trial-{trial.number:03d}"
        try:
            cfg = launch.base.load(trial_values(spec, base_cfg, launch.study, name, sampled, launch.tracker,
                                                {"trial": str(trial.number)}))
        except ConfigError as exc:
            trial.set_user_attr("error", f"ConfigError: {exc}")
            raise
        # ignore[abstract] below: base.forwards adds the run calls to TrackerGroup when it is created, unseen by mypy
        group = _TrialTrackers(build_tracker(launch.tracker, cfg),  # type: ignore[abstract]
                               lambda refs: trial.set_user_attr("runs", refs))
        pruned: dict[str, Any] = {}

        def report(epoch: int, row: dict[str, float]) -> None:
            value = float(row[spec.metric])
            trial.report(value, epoch)
            if trial.should_prune():
                pruned.update(epoch=epoch, value=value)
                group.set_tags({"trial_state": "PRUNED", "pruned_at_epoch": str(epoch)})
                raise StopTraining(f"pruned by Optuna's {spec.pruner.type} pruner after epoch {epoch} "
                                   f"({spec.metric} {value:.4f})")

        description = (f"Trial {trial.number} of study '{launch.study}'"
                       + (f" (retry of trial {retry_of[0]})" if retry_of else "") + ": "
                       + ", ".join(f"{k}={v}" for k, v in sampled.items()))
        log.info("Trial %d (worker %d): %s", trial.number, self.index,
                 ", ".join(f"{k}={v}" for k, v in sampled.items()))
        run: Callable[..., Any] = run_experiment
        if cfg["training"]["cv_folds"] > 1:  # a cross-validated trial: its value is the CV mean of the metric
            from cxrtrack.selection.cv import run_cv as run
        try:
            result = run(cfg, group, data=self.cache, callbacks=(report,), group=launch.study,
                         job_type="trial", parents=launch.parents, description=description)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:500]}")
            raise
        trial.set_user_attr("fit_s", result.timings.get("fit_s"))
        trial.set_user_attr("run_s", result.timings.get("total_s"))
        trial.set_user_attr("epochs", len(result.fit.history))
        trial.set_user_attr("run_dir", str(result.run_dir))
        if result.fit.best_epoch is not None:
            trial.set_user_attr("checkpoint", str(result.fit.checkpoint))
            trial.set_user_attr("best_epoch", result.fit.best_epoch)
        if result.status == KILLED:
            trial.set_user_attr("interrupted", True)
            raise KeyboardInterrupt
        if pruned:
            trial.set_user_attr("pruned_at_epoch", pruned["epoch"])
            raise optuna.TrialPruned(f"{spec.metric} {pruned['value']:.4f} after epoch {pruned['epoch']}")
        if result.fit.best_score is None:
            trial.set_user_attr("error", f"no epoch produced a finite {spec.metric}")
            raise RuntimeError(f"trial {trial.number}: no epoch produced a finite {spec.metric}")
        return float(result.fit.best_score)


# -- worker processes ---------------------------------------------------------------------------------


def run_workers(launch: Launch, workers: int, run_dir: Path) -> int:
    """Start ``workers`` processes on the study and wait for them; returns how many were interrupted."""
    run_dir.mkdir(parents=True, exist_ok=True)
    launch_file = run_dir / "launch.json"
    launch_file.write_text(launch.to_json())
    env = {**os.environ, "TQDM_DISABLE": "1"}  # one progress bar per worker would interleave on the terminal
    threads = str(max(1, (os.cpu_count() or 1) // workers))  # N workers x all cores each would oversubscribe the CPU
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    procs = [subprocess.Popen([sys.executable, "-m", "cxrtrack.tuning.optuna_search", "--worker", str(launch_file),
                               "--index", str(i)], env=env) for i in range(workers)]
    log.info("Started %d worker processes (pids %s) on study '%s'.", workers, ", ".join(str(p.pid) for p in procs),
             launch.study)
    interrupted = False
    while True:
        try:
            codes = [p.wait() for p in procs]
            break
        except KeyboardInterrupt:  # the workers got the same Ctrl-C: let them end their trials cleanly
            if interrupted:  # a second Ctrl-C: stop waiting
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                raise
            interrupted = True
            log.warning("Ctrl-C: waiting for the workers to end their current trials (Ctrl-C again to stop at once).")
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGINT)
    if interrupted:
        raise KeyboardInterrupt
    failed = [c for c in codes if c not in (0, 130)]
    if failed:
        raise CXRError(f"{len(failed)} of {workers} worker processes failed (exit status {failed}); see their messages "
                       f"above. Rerun the same command to resume the study.")
    return sum(c == 130 for c in codes)


def worker_main(argv: list[str] | None = None) -> int:
    from cxrtrack.cli import EXIT_INTERRUPTED, run_main, setup_logging

    parser = argparse.ArgumentParser(description="One worker process of a tuning study (started by scripts/tune.py).")
    parser.add_argument("--worker", required=True, help="the launch.json written by scripts/tune.py")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s [worker {args.index}] %(message)s",
                                               "%H:%M:%S"))

    def main() -> int:
        launch = Launch.from_json(Path(args.worker).read_text())
        Worker(launch, args.index).run()
        return 0

    def guarded() -> int:
        try:
            return main()
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    run_main(guarded)
    return 0


if __name__ == "__main__":
    worker_main()
