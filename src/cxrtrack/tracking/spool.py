"""A per-run spool: the calls a backend could not take, written down and sent later, in order.

When a call to a backend fails after its run has started (the tracking server went away, the SQLite
store is locked or its disk is full), :class:`SpoolingTracker` stops calling the backend and appends
that call and every later one to a journal, instead of losing them:

    outputs/<run>/spool/<backend>/
        spool.json       which store and run the calls belong to (written once, atomically)
        journal.jsonl    one JSON record per call, appended, flushed and fsynced before the call returns:
                         {"seq", "method", "time_ms", "args"}, ``args`` the call's arguments by name
        files/<seq>/     copies of the files a call names (artifacts, images, the checkpoint) and its arrays
                         (``.npz``), made before its record is written: a record exists only once its files
                         are complete. :data:`KEPT_AS` says which arguments these are. A record names them by
                         their path relative to the spool's folder, and nothing outside that folder is ever read
                         back (:func:`spool_file`: an absolute path, a ``..`` or a link out is refused)
        replayed.jsonl   the seq number of each record the store has taken, appended as it is acknowledged

A record is sent back as one call, ``getattr(backend, method)(**args)`` (:func:`send_record`), so any call of
:data:`~cxrtrack.tracking.base.RUN_CALLS` can be spooled without code of its own here.

Every ``reconnect_interval`` seconds (and always at the end of the run) it asks the backend whether it
answers again; if so, it sends the pending records in order, then goes back to calling the backend
directly. What is still pending when the process ends is sent by ``make replay`` (:mod:`replay`). A
record is marked only after the store took it, so a second replay sends nothing, and a crash between the
two re-sends at most that one call. The run's final status (``end_run``) is always the last record.

Training never waits for a dead store more than once: only the first failing call pays the (bounded)
HTTP timeouts and retries; the others cost a local append. W&B needs no spool of ours: its offline mode
already writes every call to a local transaction log that ``wandb sync`` uploads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrtrack.provenance import redact, scrub_secrets
from cxrtrack.tracking.base import (
    RUN_CALLS,
    Attachable,
    BaseTracker,
    Call,
    Pingable,
    Predictions,
    RunInfo,
    call_arguments,
    display_name,
    forwards,
)
from cxrtrack.utils import write_text_atomic

log = logging.getLogger(__name__)

# 1: the first format (each call's arguments written by hand); 2: arguments by name (log_predictions under
# "predictions", log_metrics with its timestamp_ms). Records are read by their shape, so a journal of either
# version replays (a run resumed after an upgrade appends version-2 records to a version-1 spool).
SPOOL_VERSION = 2
SPOOL_TAG = "cxrtrack.spool"  # run tag: where the run's spool is, so a later process can find and send it


class SpoolError(Exception):
    """The spool itself cannot be written or read (a full disk under outputs/, a damaged journal)."""


class SpoolRefused(SpoolError):
    """A spool names something replay must not send: a file outside its own folder, or an unknown call."""


# How the journal keeps the arguments that are not plain values (every other argument is written as JSON):
FILE = "file"  # copied to files/<seq>/<argument>/<its name> (the name is kept: MLflow names artifacts by it)
ARRAY = "array"  # saved to files/<seq>/<argument>.npz, under the argument's name
PREDICTIONS = "predictions"  # its arrays saved to files/<seq>/<argument>.npz, its other fields as JSON
FROM_CHECKPOINT = "from_checkpoint"  # not written: rebuilt from the call's checkpoint when it is sent again
KEPT_AS: dict[str, dict[str, str]] = {
    "log_artifact": {"path": FILE},
    "log_image": {"path": FILE},
    "log_predictions": {"predictions": PREDICTIONS},
    "log_model": {"model": FROM_CHECKPOINT, "checkpoint": FILE, "input_example": ARRAY},
}
_PREDICTION_ARRAYS = ("y_true", "y_pred", "probs", "images")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> Python values, for JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot be written to the spool")


def _fsync_append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class Spool:
    """The folder of one backend's spool (see the module docstring for its layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.journal = self.root / "journal.jsonl"
        self.done_file = self.root / "replayed.jsonl"
        self.meta_file = self.root / "spool.json"
        self._next_seq: int | None = None

    # -- writing ------------------------------------------------------------------------------------
    def create(self, meta: dict[str, Any]) -> None:
        if self.meta_file.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.meta_file, json.dumps({"version": SPOOL_VERSION, **meta}, indent=1, default=_plain))

    def append(self, method: str, args: dict[str, Any]) -> int:
        """Write one call (``args``: its arguments by name): first its files and arrays into ``files/<seq>/``
        (:data:`KEPT_AS`), then its record. Returns its seq number."""
        seq = self._seq()
        folder = self.root / "files" / f"{seq:06d}"
        try:
            time_ms = int(time.time() * 1000)
            kept = KEPT_AS.get(method, {})
            written = {}
            for name, value in args.items():
                if kept.get(name) == FROM_CHECKPOINT:
                    continue
                if name == "timestamp_ms" and value is None:
                    value = time_ms  # a spooled point keeps the time it was logged, not the time it is sent
                written[name] = self._keep(kept[name], folder, name, value) if name in kept else value
            record = {"seq": seq, "method": method, "time_ms": time_ms, "args": written}
            _fsync_append(self.journal, json.dumps(record, default=_plain, allow_nan=True))
        except (OSError, TypeError, ValueError) as exc:
            shutil.rmtree(folder, ignore_errors=True)  # no half-copied files left as if complete
            raise SpoolError(f"could not write to the spool {self.root} ({exc})") from exc
        self._next_seq = seq + 1
        return seq

    def _keep(self, kind: str, folder: Path, name: str, value: Any) -> Any:
        """Write one argument that is a file or arrays under ``folder``; what the record holds in its place."""
        if kind == FILE:
            target = folder / name / Path(value).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(value, target)
            return target.relative_to(self.root).as_posix()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}.npz"
        if kind == ARRAY:
            # dict[str, Any]: as dict[str, ndarray], mypy matches the ** against savez's bool keyword allow_pickle
            arrays: dict[str, Any] = {name: np.asarray(value)}
            np.savez(target, **arrays)
            return target.relative_to(self.root).as_posix()
        if kind == PREDICTIONS:
            np.savez(target, **{k: getattr(value, k) for k in _PREDICTION_ARRAYS})
            return {"arrays": target.relative_to(self.root).as_posix(), "class_names": list(value.class_names),
                    "paths": list(value.paths), "extra": dict(value.extra)}
        raise ValueError(f"unknown kind {kind!r} in KEPT_AS")

    def _seq(self) -> int:
        if self._next_seq is None:
            records = self.records()
            self._next_seq = (records[-1]["seq"] + 1) if records else 1
        return self._next_seq

    def mark_done(self, seq: int) -> None:
        _fsync_append(self.done_file, json.dumps({"seq": seq, "time_ms": int(time.time() * 1000)}))

    # -- reading ------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SpoolError(f"{self.meta_file} cannot be read ({exc})") from None

    def records(self) -> list[dict[str, Any]]:
        """Every record in order. A last line cut short (the process was killed while writing it) is ignored:
        its call never returned, so nothing relied on it."""
        if not self.journal.exists():
            return []
        lines = self.journal.read_text(encoding="utf-8").splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:
                    log.warning("Spool %s: ignoring its last record, cut short when the process stopped.", self.root)
                    break
                raise SpoolError(
                    f"{self.journal} line {i + 1} is damaged; fix or remove that line, then replay again.") from None
        return out

    def done(self) -> set[int]:
        if not self.done_file.exists():
            return set()
        seqs = set()
        for line in self.done_file.read_text(encoding="utf-8").splitlines():
            try:
                seqs.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                continue  # a mark cut short: that record is sent again (at most once more)
        return seqs

    def pending(self) -> list[dict[str, Any]]:
        done = self.done()
        return [r for r in self.records() if r["seq"] not in done]

    def lock(self, timeout: float = 0):
        """An inter-process lock on this spool (one sender at a time)."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"), timeout=timeout)


def record_call(record: dict[str, Any]) -> Call:
    return Call(record["method"], record["args"].get("step") if record["method"] == "log_metrics" else None)


def arguments_of(record: dict[str, Any]) -> dict[str, Any]:
    """A record's arguments as stored, in today's form. Version-1 records (journals written before the journal
    was generic) differ in two calls: ``log_predictions`` kept the fields of its Predictions as its arguments, and
    ``log_metrics`` kept its time only as the record's ``time_ms``."""
    method, args = record["method"], dict(record["args"])
    if method == "log_predictions" and "predictions" not in args:
        args = {"predictions": {k: args[k] for k in ("arrays", "class_names", "paths", "extra")}}
    if method == "log_metrics":
        args.setdefault("timestamp_ms", record["time_ms"])
    return args


def spool_file(root: Path, value: Any) -> Path:
    """The file a record names, resolved, if it lies inside the spool's own folder: a record names the copies of its
    files by their path relative to that folder (``files/<seq>/...``). Anything else is refused before any store is
    called: an absolute path, a ``..`` that climbs out, or a link that points out of the folder (a spool folder is
    data on disk, and may have been written by someone else)."""
    base = Path(root).resolve()
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        raise SpoolRefused(f"{Path(root) / 'journal.jsonl'} names the file {value!r}, outside its own folder {base} (a "
                           f"spool names the copies of its files by their path inside that folder)")
    path = (base / value).resolve()
    if not path.is_relative_to(base):
        raise SpoolRefused(f"{Path(root) / 'journal.jsonl'} names the file {value!r}, which leads to {path}, "
                           f"outside its own folder {base} (a '..' or a link out of it)")
    return path


def check_record(root: Path, record: dict[str, Any]) -> None:
    """Refuse (:class:`SpoolRefused`) a record that names an unknown call or a file outside the spool's folder
    (:func:`spool_file`), without sending anything: replay checks every pending record before it calls the store."""
    method = record.get("method")
    if method not in (*RUN_CALLS, "end_run"):
        raise SpoolRefused(f"unknown call {method!r} in {Path(root) / 'journal.jsonl'} (record {record.get('seq')})")
    kept = KEPT_AS.get(method, {})
    try:
        args = arguments_of(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpoolRefused(
            f"record {record.get('seq')} of {Path(root) / 'journal.jsonl'} is malformed ({exc!r})") from None
    for name, value in args.items():
        if kept.get(name) in (FILE, ARRAY):
            spool_file(root, value)
        elif kept.get(name) == PREDICTIONS:
            spool_file(root, value.get("arrays") if isinstance(value, dict) else value)


def _restore(root: Path, method: str, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call as it is sent again: the copies of its files, its arrays read back (only from inside
    the spool's folder: :func:`spool_file`)."""
    kept = KEPT_AS.get(method, {})
    out: dict[str, Any] = {}
    for name, value in args.items():
        kind = kept.get(name)
        if kind == FILE:
            out[name] = spool_file(root, value)
        elif kind == ARRAY:
            with np.load(spool_file(root, value)) as z:
                out[name] = z[name]
        elif kind == PREDICTIONS:
            with np.load(spool_file(root, value["arrays"])) as z:
                arrays = {k: z[k] for k in _PREDICTION_ARRAYS}
            out[name] = Predictions(tuple(value["class_names"]), paths=list(value["paths"]), extra=dict(value["extra"]),
                                    **arrays)
        else:
            out[name] = value
    if any(kind == FROM_CHECKPOINT for kind in kept.values()):
        # imported here: torch is loaded only when a spooled model is sent, not with the spool
        from cxrtrack.models.checkpoint import load_model

        out.update({name: load_model(out["checkpoint"]) for name, kind in kept.items() if kind == FROM_CHECKPOINT})
    return out


def send_record(backend: BaseTracker, spool: Spool, record: dict[str, Any]) -> None:
    """Send one spooled call to ``backend`` (a live backend, or one attached to the run by ``attach``)."""
    method = record["method"]
    if method not in (*RUN_CALLS, "end_run"):
        raise SpoolError(f"unknown call {method!r} in {spool.journal} (record {record['seq']})")
    getattr(backend, method)(**_restore(spool.root, method, arguments_of(record)))


@forwards(*RUN_CALLS)
class SpoolingTracker(BaseTracker):
    """Wraps one backend: calls go straight to it until one fails, then to the spool until it answers again.

    Every call of :data:`~cxrtrack.tracking.base.RUN_CALLS` goes through :meth:`_call`. Attributes of the backend
    (``run_id``, ``tracking_uri``, ...) are reachable through this wrapper."""

    def __init__(self, inner: BaseTracker, output_dir: str | Path, reconnect_interval: float = 15.0):
        self.inner = inner
        self.name = inner.name
        self.output_dir = Path(output_dir)
        self.reconnect_interval = float(reconnect_interval)
        self.spool: Spool | None = None
        self.spooling = False
        self.spooled = 0  # calls written to the spool in this process
        self.replayed = 0  # of which sent to the store later in this process
        self._last_attempt: float | None = None  # monotonic time of the last reconnect attempt (None: never)
        self._run: RunInfo | None = None

    def __getattr__(self, item):  # only called for attributes this wrapper does not have
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)

    # -- lifecycle --------------------------------------------------------------------------------
    def setup(self) -> None:
        self.inner.setup()

    def start_run(self, run: RunInfo) -> None:
        """Starting is never spooled: a store that cannot start a run fails before anything is trained."""
        self._run = run
        self.spool = Spool(self.output_dir / run.name / "spool" / self.name)
        self.inner.start_run(dataclasses.replace(run, tags={**run.tags, SPOOL_TAG: str(self.spool.root.resolve())}))

    def end_run(self, status: str = "FINISHED") -> None:
        if self.spooling:
            self._reconnect(force=True)  # the last chance in this process: try now, whatever the interval
        if not self.spooling:
            try:
                self.inner.end_run(status)
                return
            except Exception as exc:  # noqa: BLE001
                self._begin_outage("end_run", exc)
        self._journal("end_run", {"status": status})
        if isinstance(self.inner, Attachable):
            self.inner.abandon()
        spool = self._started()
        pending = spool.pending()
        log.warning("%s: the store did not answer at the end of the run: %d call(s), the final status (%s) last, "
                    "wait in %s; `make replay` sends them in order when it answers.", display_name(self.name),
                    len(pending), status, spool.root)

    # -- the calls --------------------------------------------------------------------------------
    def _call(self, method: str, *args, **kwargs) -> None:
        if self.spooling:
            self._reconnect()
        if not self.spooling:
            try:
                getattr(self.inner, method)(*args, **kwargs)
                return
            except Exception as exc:  # noqa: BLE001 - the call is kept in the spool instead of lost
                self._begin_outage(method, exc)
        self._journal(method, call_arguments(method, args, kwargs))

    # -- the spool --------------------------------------------------------------------------------
    def _begin_outage(self, method: str, exc: Exception) -> None:
        self.spooling = True
        self._last_attempt = time.monotonic()
        log.warning("%s: %s failed (%s: %s). This call and the next ones go to the spool %s and are sent in order "
                    "when the store answers again (checked every %g s, and at the end of the run); training goes on.",
                    display_name(self.name), method, type(exc).__name__, redact(" ".join(str(exc).split()))[:300],
                    self.spool.root if self.spool else "(none)", self.reconnect_interval)

    def _started(self) -> Spool:
        """The run's spool; :class:`SpoolError` before ``start_run`` made one."""
        if self.spool is None:
            raise SpoolError("the run was never started, so there is no spool to keep the call")
        return self.spool

    def _journal(self, method: str, args: dict[str, Any]) -> None:
        spool = self._started()
        try:
            spool.create({
                "backend": self.name, "run_name": self._run.name if self._run else None, "ref": self.inner.run_ref(),
                "experiment": getattr(self.inner, "experiment", None),
                "tracker_cfg": scrub_secrets(getattr(self.inner, "cfg", {})),
                "process": {"pid": os.getpid(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            })
        except OSError as exc:
            raise SpoolError(f"could not write to the spool {spool.root} ({exc.strerror or exc})") from exc
        spool.append(method, args)
        self.spooled += 1

    def _reconnect(self, force: bool = False) -> None:
        """If ``reconnect_interval`` has passed since the last attempt (or ``force``) and the backend answers, send
        the spool. (``time.monotonic`` counts from an arbitrary point, the machine's boot on Linux: "never tried" is
        ``None``, not 0.0, or a machine up for less than the interval would never try.)"""
        last = self._last_attempt
        if not force and last is not None and time.monotonic() - last < self.reconnect_interval:
            return
        self._last_attempt = time.monotonic()
        if isinstance(self.inner, Pingable) and not self.inner.ping():
            return
        self.drain()
        self._last_attempt = time.monotonic()

    def drain(self) -> bool:
        """Send every pending record in order; True when the spool is empty (the backend is live again)."""
        from filelock import Timeout

        spool = self._started()
        try:
            with spool.lock(timeout=0):
                for record in spool.pending():
                    try:
                        send_record(self.inner, spool, record)
                    except Exception as exc:  # noqa: BLE001 - still down: stay on the spool
                        log.info("%s: the store still fails (%s); calls stay in the spool.", display_name(self.name),
                                 redact(" ".join(str(exc).split()))[:200])
                        return False
                    spool.mark_done(record["seq"])
                    self.replayed += 1
        except Timeout:
            return False  # `make replay` is sending it right now
        if self.spooling:
            log.warning("%s answers again: sent the %d spooled call(s) in order; logging directly again.",
                        display_name(self.name), self.replayed)
        self.spooling = False
        return True

    # -- reporting --------------------------------------------------------------------------------
    def unsaved(self) -> list[Call]:
        if self.spool is None or not self.spool.journal.exists():
            return []
        return [record_call(r) for r in self.spool.pending()]

    def where_unsaved(self) -> str | None:
        if self.spool is None:
            return None
        return f"kept in {self.spool.root}; `make replay` sends them when the store answers"

    def run_ref(self) -> dict[str, Any]:
        ref = dict(self.inner.run_ref())
        if self.spool is not None and self.spool.journal.exists():
            ref["spool"] = str(self.spool.root)
        return ref

    def describe(self) -> str:
        return self.inner.describe()
