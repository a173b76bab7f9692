"""A per-run spool: the calls a backend could not take, written down and sent later, in order.

When a call to a backend fails after its run has started (the tracking server went away, the SQLite
store is locked or its disk is full), :class:`SpoolingTracker` stops calling the backend and appends
that call and every later one to a journal, instead of losing them:

    outputs/<run>/spool/<backend>/
        spool.json       which store and run the calls belong to (written once, atomically)
        journal.jsonl    one JSON record per call, appended, flushed and fsynced before the call returns
        files/<seq>/     copies of the files a call names (artifacts, images, the checkpoint), made before
                         its record is written: a record exists only once its files are complete
        replayed.jsonl   the seq number of each record the store has taken, appended as it is acknowledged

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
import inspect
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
from cxrtrack.tracking.base import BaseTracker, Call, Predictions, RunInfo, display_name
from cxrtrack.utils import write_text_atomic

log = logging.getLogger(__name__)

SPOOL_VERSION = 1
SPOOL_TAG = "cxrtrack.spool"  # run tag: where the run's spool is, so a later process can find and send it


class SpoolError(Exception):
    """The spool itself cannot be written or read (a full disk under outputs/, a damaged journal)."""


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

    def append(self, method: str, args: dict[str, Any], files: dict[str, Path] | None = None,
               arrays: dict[str, dict[str, np.ndarray]] | None = None) -> int:
        """Write one call: copy its ``files`` (key -> source) and save its ``arrays`` (key -> npz contents) into
        ``files/<seq>/``, then append its record. Returns its seq number."""
        seq = self._seq()
        folder = self.root / "files" / f"{seq:06d}"
        try:
            for key, source in (files or {}).items():
                target = folder / key / Path(source).name  # the name is kept: MLflow names artifacts by it
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                args[key] = target.relative_to(self.root).as_posix()
            for key, content in (arrays or {}).items():
                folder.mkdir(parents=True, exist_ok=True)
                target = folder / f"{key}.npz"
                np.savez(target, **content)
                args[key] = target.relative_to(self.root).as_posix()
            record = {"seq": seq, "method": method, "time_ms": int(time.time() * 1000), "args": args}
            _fsync_append(self.journal, json.dumps(record, default=_plain, allow_nan=True))
        except (OSError, TypeError, ValueError) as exc:
            shutil.rmtree(folder, ignore_errors=True)  # no half-copied files left as if complete
            raise SpoolError(f"could not write to the spool {self.root} ({exc})") from exc
        self._next_seq = seq + 1
        return seq

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
                raise SpoolError(f"{self.journal} line {i + 1} is damaged; fix or remove that line, then replay again.") from None
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


def send_record(backend: BaseTracker, spool: Spool, record: dict[str, Any]) -> None:
    """Send one spooled call to ``backend`` (a live backend, or one attached to the run by ``attach``)."""
    method, a, root = record["method"], dict(record["args"]), spool.root
    if method == "log_metrics":
        kwargs = {}
        if "timestamp_ms" in inspect.signature(backend.log_metrics).parameters:
            kwargs["timestamp_ms"] = record["time_ms"]  # the point keeps the time it was computed
        backend.log_metrics(a["metrics"], a["step"], **kwargs)
    elif method == "log_params":
        backend.log_params(a["params"])
    elif method == "log_summary":
        backend.log_summary(a["metrics"])
    elif method == "set_tags":
        backend.set_tags(a["tags"])
    elif method == "log_artifact":
        backend.log_artifact(root / a["path"], a["artifact_path"])
    elif method == "log_image":
        backend.log_image(root / a["path"], a["name"], a["caption"])
    elif method == "log_table":
        backend.log_table(a["name"], a["rows"])
    elif method == "log_predictions":
        with np.load(root / a["arrays"]) as z:
            predictions = Predictions(tuple(a["class_names"]), z["y_true"], z["y_pred"], z["probs"], list(a["paths"]),
                                      z["images"], dict(a["extra"]))
        backend.log_predictions(predictions)
    elif method == "log_model":
        from cxrtrack.models.cxrnet import load_model

        with np.load(root / a["input_example"]) as z:
            example = z["input_example"]
        backend.log_model(load_model(root / a["checkpoint"]), root / a["checkpoint"], example, a["metadata"])
    elif method == "log_dataset":
        backend.log_dataset(a["dataset"])
    elif method == "end_run":
        backend.end_run(a["status"])
    else:
        raise SpoolError(f"unknown call {method!r} in {spool.journal} (record {record['seq']})")


class SpoolingTracker(BaseTracker):
    """Wraps one backend: calls go straight to it until one fails, then to the spool until it answers again.

    Attributes of the backend (``run_id``, ``tracking_uri``, ...) are reachable through this wrapper."""

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
        if hasattr(self.inner, "abandon"):
            self.inner.abandon()
        pending = self.spool.pending()
        log.warning("%s: the store did not answer at the end of the run: %d call(s), the final status (%s) last, wait in "
                    "%s; `make replay` sends them in order when it answers.", display_name(self.name), len(pending),
                    status, self.spool.root)

    # -- the calls --------------------------------------------------------------------------------
    def log_params(self, params):
        self._forward("log_params", {"params": params}, lambda: self.inner.log_params(params))

    def log_metrics(self, metrics, step):
        metrics = {k: float(v) for k, v in metrics.items()}
        self._forward("log_metrics", {"metrics": metrics, "step": step}, lambda: self.inner.log_metrics(metrics, step))

    def log_summary(self, metrics):
        metrics = {k: float(v) for k, v in metrics.items()}
        self._forward("log_summary", {"metrics": metrics}, lambda: self.inner.log_summary(metrics))

    def set_tags(self, tags):
        self._forward("set_tags", {"tags": dict(tags)}, lambda: self.inner.set_tags(tags))

    def log_dataset(self, dataset):
        self._forward("log_dataset", {"dataset": dict(dataset)}, lambda: self.inner.log_dataset(dataset))

    def log_artifact(self, path, artifact_path=None):
        self._forward("log_artifact", {"artifact_path": artifact_path}, lambda: self.inner.log_artifact(path, artifact_path),
                      files={"path": Path(path)})

    def log_image(self, path, name, caption=None):
        self._forward("log_image", {"name": name, "caption": caption}, lambda: self.inner.log_image(path, name, caption),
                      files={"path": Path(path)})

    def log_table(self, name, rows):
        rows = [dict(r) for r in rows]
        self._forward("log_table", {"name": name, "rows": rows}, lambda: self.inner.log_table(name, rows))

    def log_predictions(self, predictions: Predictions):
        p = predictions
        self._forward("log_predictions", {"class_names": list(p.class_names), "paths": list(p.paths), "extra": dict(p.extra)},
                      lambda: self.inner.log_predictions(p),
                      arrays={"arrays": {"y_true": p.y_true, "y_pred": p.y_pred, "probs": p.probs, "images": p.images}})

    def log_model(self, model, checkpoint, input_example, metadata):
        self._forward("log_model", {"metadata": dict(metadata)},
                      lambda: self.inner.log_model(model, checkpoint, input_example, metadata),
                      files={"checkpoint": Path(checkpoint)},
                      arrays={"input_example": {"input_example": np.asarray(input_example)}})

    def _forward(self, method: str, args: dict[str, Any], call, files=None, arrays=None) -> None:
        if self.spooling:
            self._reconnect()
        if not self.spooling:
            try:
                call()
                return
            except Exception as exc:  # noqa: BLE001 - the call is kept in the spool instead of lost
                self._begin_outage(method, exc)
        self._journal(method, args, files, arrays)

    # -- the spool --------------------------------------------------------------------------------
    def _begin_outage(self, method: str, exc: Exception) -> None:
        self.spooling = True
        self._last_attempt = time.monotonic()
        log.warning("%s: %s failed (%s: %s). This call and the next ones go to the spool %s and are sent in order "
                    "when the store answers again (checked every %g s, and at the end of the run); training goes on.",
                    display_name(self.name), method, type(exc).__name__, redact(" ".join(str(exc).split()))[:300],
                    self.spool.root if self.spool else "(none)", self.reconnect_interval)

    def _journal(self, method, args, files=None, arrays=None) -> None:
        if self.spool is None:
            raise SpoolError("the run was never started, so there is no spool to keep the call")
        try:
            self.spool.create({
                "backend": self.name, "run_name": self._run.name if self._run else None, "ref": self.inner.run_ref(),
                "experiment": getattr(self.inner, "experiment", None),
                "tracker_cfg": scrub_secrets(getattr(self.inner, "cfg", {})),
                "process": {"pid": os.getpid(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            })
        except OSError as exc:
            raise SpoolError(f"could not write to the spool {self.spool.root} ({exc.strerror or exc})") from exc
        self.spool.append(method, args, files, arrays)
        self.spooled += 1

    def _reconnect(self, force: bool = False) -> None:
        """If ``reconnect_interval`` has passed since the last attempt (or ``force``) and the backend answers, send
        the spool. (``time.monotonic`` counts from an arbitrary point, the machine's boot on Linux: "never tried" is
        ``None``, not 0.0, or a machine up for less than the interval would never try.)"""
        last = self._last_attempt
        if not force and last is not None and time.monotonic() - last < self.reconnect_interval:
            return
        self._last_attempt = time.monotonic()
        ping = getattr(self.inner, "ping", None)
        if ping is not None and not ping():
            return
        self.drain()
        self._last_attempt = time.monotonic()

    def drain(self) -> bool:
        """Send every pending record in order; True when the spool is empty (the backend is live again)."""
        from filelock import Timeout

        try:
            with self.spool.lock(timeout=0):
                for record in self.spool.pending():
                    try:
                        send_record(self.inner, self.spool, record)
                    except Exception as exc:  # noqa: BLE001 - still down: stay on the spool
                        log.info("%s: the store still fails (%s); calls stay in the spool.", display_name(self.name),
                                 redact(" ".join(str(exc).split()))[:200])
                        return False
                    self.spool.mark_done(record["seq"])
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
