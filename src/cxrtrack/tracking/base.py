"""The tracker interface every backend implements, the fan-out group the trainer talks to, and the recording
tracker every group keeps (what the run sent: ``tracked.json``).

The trainer only ever sees a :class:`TrackerGroup`. It forwards each call to every backend (none,
one or several) and isolates them: once a run has started, an exception inside a backend is logged
and counted, never raised, so a tracker problem cannot kill a long training run. Failing to *start* a
run is raised (as :class:`~cxrtrack.errors.TrackerError`), because nothing has been trained yet.

Used as a context manager, the group ends the run ``FAILED`` on an exception, ``KILLED`` on Ctrl-C
(``KeyboardInterrupt``) and ``FINISHED`` otherwise.

The interface is written down once: :class:`BaseTracker` (what every backend implements), :data:`RUN_CALLS`
(the calls that log to an open run, which the wrappers forward by name: :func:`forwards`), and the optional
capabilities as :class:`typing.Protocol` classes, :class:`Pingable` and :class:`Attachable`, which the spool,
replay and ``make evaluate`` check with ``isinstance``. docs/architecture.md says why each method exists.
"""

from __future__ import annotations

import abc
import functools
import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from cxrtrack import signals
from cxrtrack.config import flatten
from cxrtrack.errors import TrackerError
from cxrtrack.tracking.readback import RunRecord

log = logging.getLogger(__name__)

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
STATUSES = (FINISHED, FAILED, KILLED)


@dataclass
class Predictions:
    """Test-set predictions, for tracker-native views (tables, charts, captioned images)."""

    class_names: tuple[str, ...]
    y_true: np.ndarray  # (N,) int
    y_pred: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, C) float
    paths: list[str]
    images: np.ndarray  # (N, H, W) uint8, the model's input before normalisation
    extra: dict[str, Any] = field(default_factory=dict)

    def caption(self, i: int) -> str:
        true, pred = self.class_names[self.y_true[i]], self.class_names[self.y_pred[i]]
        mark = "correct" if true == pred else "WRONG"
        confidence = self.probs[i, self.y_pred[i]]
        return f"true: {true} | pred: {pred} ({confidence:.0%}) | {mark} | {Path(self.paths[i]).name}"


@dataclass
class RunInfo:
    """What a backend needs to open a run. Plain values only, so a run can be written down and replayed.

    ``config`` is the nested, secret-free run configuration plus the values derived at run time
    (``dataset.*``, ``model.num_parameters``, ``device``): MLflow flattens it into params, W&B keeps it
    nested. ``group`` and ``parents`` place the run in a hierarchy (a tuning study, a comparison):
    ``parents`` maps a backend name to that backend's own id of the parent run (an MLflow run id);
    W&B has no parent runs and groups runs by ``group`` instead. ``job_type`` says what the run is
    (``train``, ``trial``, ``study``, ``evaluation``). ``resume`` maps a backend name to the id of one
    of its existing runs to reopen instead of creating a new one (an MLflow tuning study's parent run,
    reopened when the study is resumed); backends that cannot reopen a run start a new one.
    """

    name: str
    config: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    job_type: str = "train"
    parents: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    resume: dict[str, str] = field(default_factory=dict)


class BaseTracker(ABC):
    """One tracking backend. Implementations import their library lazily, in :meth:`setup`."""

    name: str = "base"

    def setup(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Import the client library (timed apart from :meth:`start_run`, so import cost is visible)."""

    @abstractmethod
    def start_run(self, run: RunInfo) -> None:
        """Open a run and record ``run.config`` and ``run.tags`` in it."""

    @abstractmethod
    def log_params(self, params: dict[str, Any]) -> None:
        """More (nested) configuration after the start, e.g. values known only later."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Metrics of one epoch; ``step`` is the epoch number (1-based). ``timestamp_ms``: when they were computed
        (milliseconds since the epoch), given when the call is sent later (a spooled call keeps its time);
        None: now. A backend whose store has no time per point ignores it."""

    @abstractmethod
    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final numbers of the run (best validation, test), not tied to an epoch."""

    @abstractmethod
    def set_tags(self, tags: dict[str, str]) -> None: ...

    @abstractmethod
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file under the folder ``artifact_path`` of the run."""

    @abstractmethod
    def log_image(self, path: Path, name: str, caption: str | None = None) -> None:
        """A PNG the run wrote (a plot, a montage), shown as an image named ``name`` (``plots/roc_curves.png``)."""

    @abstractmethod
    def log_predictions(self, predictions: Predictions) -> None:
        """Test predictions in the backend's native form (table, confusion-matrix chart, images)."""

    @abstractmethod
    def log_model(self, model, checkpoint: Path, input_example: np.ndarray, metadata: dict[str, Any]) -> None:
        """The trained model in the backend's model store (registry / versioned artifact)."""

    def log_dataset(self, dataset: dict[str, Any]) -> None:  # noqa: B027 - optional, a no-op by default
        """The data the run trained and was tested on, as the backend's dataset lineage (plain values only):
        ``name``, ``source``, ``fingerprint`` (content digest), ``root`` (folder), ``test_split`` and ``splits``
        (split -> class name -> image count)."""

    def flush(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Write out what the backend has queued (asynchronous logging, collected files) now."""

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows of plain values (one dict per row, same keys) as the backend's native table, e.g. the trials
        of a tuning study. Not abstract, so existing backends keep working; one that lacks it says so."""
        raise NotImplementedError(f"the {self.name} tracker cannot log tables")

    @abstractmethod
    def end_run(self, status: str = FINISHED) -> None:
        """Close the run with one of :data:`STATUSES` (after a :meth:`flush`)."""

    def describe(self) -> str:
        """One line telling the user where to find the run."""
        return self.name

    def run_ref(self) -> dict[str, Any]:
        """Plain values that find this run again in its store (ids, folders): kept in ``tracked.json``."""
        return {}

    def unsaved(self) -> list[Call]:
        """Calls that returned without error but are not in the store yet (a spool waiting for its server)."""
        return []

    def where_unsaved(self) -> str | None:
        """Where the calls of :meth:`unsaved` are kept and how to send them, for the run's last line."""
        return None


#: The calls that log to an open run (between :meth:`~BaseTracker.start_run` and :meth:`~BaseTracker.end_run`),
#: by name. Each takes plain values, paths and arrays, so it can be forwarded (:class:`TrackerGroup`), written to a
#: journal and sent again later by name (``tracking/spool.py``, whose ``KEPT_AS`` table says which arguments are
#: files or arrays).
RUN_CALLS = ("log_params", "log_dataset", "log_metrics", "log_summary", "set_tags", "log_artifact", "log_image",
             "log_table", "log_predictions", "log_model")


@runtime_checkable
class Pingable(Protocol):
    """A backend whose store can say quickly whether it answers. The spool asks before it sends what it holds
    (a backend without it is taken to answer), replay asks before it starts."""

    def ping(self, timeout: float = ...) -> bool:
        """One bounded probe, no retries: True when the store answers."""
        ...


@runtime_checkable
class Attachable(Protocol):
    """A backend that can add to a run some other process (or tracker object) created, found again by that
    tracker's :meth:`~BaseTracker.run_ref`: ``make replay`` sends a spool's calls to it, ``make evaluate`` reports
    its results back to it (:func:`cxrtrack.tracking.attached`)."""

    def attach(self, ref: dict[str, Any], reopen: bool = True) -> None:
        """Make the run of ``ref`` the one this tracker logs to. ``reopen``: the run is open again until
        :meth:`~BaseTracker.end_run` sets its final status (replay); False: only add to it, its status stays as
        it is (report back). A backend that cannot tell the two apart reopens."""
        ...

    def abandon(self) -> None:
        """Let go of the run without giving it a status: the spool keeps ``end_run`` for later, a report back
        leaves the status as the training run set it."""
        ...


@functools.cache
def _signature(method: str) -> inspect.Signature:
    return inspect.signature(getattr(BaseTracker, method))


def call_arguments(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by name, defaults filled in, as :class:`BaseTracker` declares them:
    ``("log_metrics", ({"loss": 1.0}, 3), {})`` -> ``{"metrics": {"loss": 1.0}, "step": 3, "timestamp_ms": None}``."""
    bound = _signature(method).bind(None, *args, **kwargs)  # None stands for self
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["self"]
    return arguments


_Cls = TypeVar("_Cls", bound=type)


def forwards(*methods: str) -> Callable[[_Cls], _Cls]:
    """Class decorator for a tracker that wraps others: each of ``methods`` the class does not write itself becomes
    ``self._call(method, *args, **kwargs)``, with :class:`BaseTracker`'s signature and docstring. The wrappers
    (:class:`TrackerGroup`, ``SpoolingTracker``) thus take every call of :data:`RUN_CALLS` without listing them."""

    def decorate(cls: _Cls) -> _Cls:
        for method in methods:
            if method not in vars(cls):
                setattr(cls, method, _forwarder(cls, method))
        abc.update_abstractmethods(cls)
        return cls

    return decorate


def _forwarder(cls: type, method: str) -> Callable[..., Any]:
    def forward(self, *args, **kwargs):
        return self._call(method, *args, **kwargs)

    forward.__name__, forward.__qualname__ = method, f"{cls.__qualname__}.{method}"
    forward.__doc__ = getattr(BaseTracker, method).__doc__
    forward.__signature__ = _signature(method)  # type: ignore[attr-defined]
    return forward


@dataclass
class Call:
    """One tracker call that did not reach its store, described for the user (not replayable by itself)."""

    method: str
    step: int | None = None  # log_metrics: the epoch
    error: str | None = None


_WHAT = {"log_dataset": "the dataset lineage", "log_params": "params", "set_tags": "tags",
         "log_summary": "final metrics", "log_predictions": "the predictions table", "log_model": "the model",
         "end_run": "the final status", "start_run": "the run itself"}
_DISPLAY = {"mlflow": "MLflow", "wandb": "W&B"}


def display_name(backend: str) -> str:
    return _DISPLAY.get(backend, backend)


def _epochs(steps: list[int]) -> str:
    """[1, 2, 3, 5] -> "epochs 1-3, 5"."""
    steps = sorted(set(steps))
    runs: list[list[int]] = []  # [first, last] of each run of consecutive epochs
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)
    return f"epoch{'s' if len(steps) > 1 else ''} {text}"


def describe_calls(calls: list[Call]) -> str:
    """What a list of calls held, in words: "metrics of epochs 2-3, 9 files, the model and the final status"."""
    parts: list[str] = []
    counts: dict[str, int] = {}
    steps = [c.step for c in calls if c.method == "log_metrics" and c.step is not None]
    for call in calls:
        counts[call.method] = counts.get(call.method, 0) + 1
    for method in dict.fromkeys(c.method for c in calls):
        if method == "log_metrics":
            parts.append(f"metrics of {_epochs(steps)}" if steps else "metrics")
        elif method == "log_artifact":
            parts.append(f"{counts[method]} file{'s' if counts[method] > 1 else ''}")
        elif method == "log_image":
            parts.append(f"{counts[method]} image{'s' if counts[method] > 1 else ''}")
        else:
            parts.append(_WHAT.get(method, method))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


PREDICTIONS_TABLE = "test/predictions"  # the name both backends give the table of log_predictions


class RecordingTracker(BaseTracker):
    """A backend that stores nothing anywhere: every call goes into one :class:`RunRecord` (``self.record``), the
    shape ``readback`` reads a store back into, so what a run sent and what a store holds compare item by item
    (``readback.diff_records``). Every :class:`TrackerGroup` keeps one (``group.record``: ``tracked.json``), and
    contract tests use one as a fast stand-in for a store.

    Names as the stores show them: params flattened (``data.image_size``), an artifact as
    ``<artifact_path>/<file name>``, an image by its name, a table by its name with its number of rows (the
    predictions as ``test/predictions``), a model as ``model_name``."""

    name = "recorded"

    def __init__(self, model_name: str = "CustomCXRNet"):
        self.model_name = model_name
        self.record = RunRecord()

    def start_run(self, run: RunInfo) -> None:
        self.record = RunRecord(name=run.name, params=flatten(run.config), tags=dict(run.tags))

    def log_params(self, params: dict[str, Any]) -> None:
        self.record.params.update(flatten(params))

    def log_dataset(self, dataset: dict[str, Any]) -> None:
        self.record.extra["dataset"] = dict(dataset)

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        for key, value in metrics.items():
            self.record.metrics.setdefault(key, []).append((int(step), float(value)))

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.record.summary.update(metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.record.tags.update(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        name = f"{artifact_path}/{Path(path).name}" if artifact_path else Path(path).name
        self.record.artifacts = sorted({*self.record.artifacts, name})

    def log_image(self, path: Path, name: str, caption: str | None = None) -> None:
        self.record.images = sorted({*self.record.images, name})

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.record.tables[name] = len(rows)

    def log_predictions(self, predictions: Predictions) -> None:
        self.record.tables[PREDICTIONS_TABLE] = len(predictions.y_true)

    def log_model(self, model, checkpoint: Path, input_example: np.ndarray, metadata: dict[str, Any]) -> None:
        self.record.models.append(self.model_name)

    def end_run(self, status: str = FINISHED) -> None:
        self.record.status = status


@forwards(*RUN_CALLS, "flush")
class TrackerGroup(BaseTracker):
    """Fan-out to several backends, each isolated from the others and from training. Every call of
    :data:`RUN_CALLS` (and ``flush``) goes through :meth:`_call`. A :class:`RecordingTracker` beside the backends
    (not one of ``trackers``) keeps every call as the run's record of what was sent: ``group.record``."""

    name = "group"

    def __init__(self, trackers: list[BaseTracker] | None = None, max_errors: int = 20):
        self.recorder = RecordingTracker()  # gets every call first, whatever the backends do with it
        self.trackers = list(trackers or [])
        self.errors: Counter[str] = Counter()
        self.max_errors = max_errors
        self.status: str | None = None
        # backend -> calls that raised or were skipped after max_errors: not in that store (unless a spool kept them)
        self.failed: dict[str, list[Call]] = defaultdict(list)
        # backend -> method -> seconds of every call: what each tracker costs, per call (timings.json)
        self.call_times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def _timed(self, tracker: BaseTracker, method: str, *args, **kwargs) -> None:
        start = time.perf_counter()
        try:
            with signals.critical():  # Ctrl-C / SIGTERM wait for the call to finish (a second one does not)
                getattr(tracker, method)(*args, **kwargs)
        finally:
            self.call_times[tracker.name][method].append(time.perf_counter() - start)

    def call_summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """backend -> method -> {calls, total_s, max_s}: the per-call costs of this run."""
        return {
            name: {m: {"calls": len(t), "total_s": sum(t), "max_s": max(t)} for m, t in methods.items()}
            for name, methods in self.call_times.items()
        }

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    @property
    def record(self) -> RunRecord:
        """What this run sent to its trackers (``tracked.json``); each backend's ``run_ref()`` is the caller's to
        add."""
        return self.recorder.record

    def _record(self, method: str, *args, **kwargs) -> None:
        try:
            getattr(self.recorder, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the record must not stop training either
            log.warning("The record of what was sent (tracked.json) misses a %s call (%s: %s).", method,
                        type(exc).__name__, exc)

    def record_only(self, method: str, *args, **kwargs) -> None:
        """Put a call into the run's record without sending it (a resumed run's earlier epochs: already in the
        stores); like every call, it never raises."""
        self._record(method, *args, **kwargs)

    def _call(self, method: str, *args, **kwargs) -> None:
        step = call_arguments(method, args, kwargs).get("step")  # log_metrics: the epoch, for the user's summary
        self._record(method, *args, **kwargs)
        for tracker in self.trackers:
            if self.errors[tracker.name] >= self.max_errors and method != "end_run":
                # gave up on this backend (it already said why), but always try to close its run
                self.failed[tracker.name].append(Call(method, step, "skipped after too many errors"))
                continue
            try:
                self._timed(tracker, method, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                self.errors[tracker.name] += 1
                self.failed[tracker.name].append(Call(method, step, f"{type(exc).__name__}: {exc}"))
                log.warning("%s tracker: %s failed (%s: %s); training continues.",
                            tracker.name, method, type(exc).__name__, exc)
                if self.errors[tracker.name] == self.max_errors:
                    log.warning("%s tracker: %d errors, ignoring it for the rest of this run.",
                                tracker.name, self.max_errors)

    def start_run(self, run: RunInfo) -> None:
        self._record("start_run", run)
        started: list[BaseTracker] = []
        for tracker in self.trackers:
            try:
                self._timed(tracker, "setup")
                self._timed(tracker, "start_run", run)
            except Exception as exc:
                for other in started:  # do not leave half the trackers with an open run
                    try:
                        other.end_run(FAILED)
                    except Exception:  # noqa: BLE001
                        pass
                if isinstance(exc, TrackerError):
                    raise
                raise TrackerError(
                    f"Could not start the {tracker.name} run ({type(exc).__name__}: {exc}). Nothing was trained. "
                    f"Check the tracker settings under tracking.{tracker.name} in the config, or run with "
                    f"--tracker none to train without it."
                ) from exc
            started.append(tracker)

    def end_run(self, status: str = FINISHED) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        self.status = status
        self._call("end_run", status)

    def describe(self) -> str:
        return "; ".join(t.describe() for t in self.trackers) or "no tracker"

    def problems(self) -> dict[str, str]:
        """backend -> one sentence on what its store is missing and where it is (empty: every store has it all)."""
        out = {}
        for tracker in self.trackers:
            failed, pending = self.failed.get(tracker.name, []), tracker.unsaved()
            if not failed and not pending:
                continue
            text = []
            if failed:
                last = " ".join((failed[-1].error or "").split())[:300]
                calls = "call" if len(failed) == 1 else "calls"
                text.append(f"{describe_calls(failed)} not saved ({len(failed)} failed {calls}; last error: {last})")
            if pending:
                calls = "call" if len(pending) == 1 else "calls"
                text.append(f"{describe_calls(pending)} not stored yet ({len(pending)} {calls} "
                            f"{tracker.where_unsaved() or 'pending'})")
            out[tracker.name] = "; ".join(text)
        return out

    def unsaved_count(self) -> int:
        return sum(len(v) for v in self.failed.values()) + sum(len(t.unsaved()) for t in self.trackers)

    def __enter__(self) -> TrackerGroup:
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:  # an exception is never swallowed
        if self.status is None:  # not ended explicitly
            if exc_type is None:
                self.end_run(FINISHED)
            elif issubclass(exc_type, KeyboardInterrupt):
                self.end_run(KILLED)
            else:
                self.end_run(FAILED)
        return False
