"""Send spooled calls to their store later (``make replay``), and close runs whose process was killed.

:func:`replay_spool` re-opens the run the spool belongs to (by its id), sends the pending records in
order and marks each one as it is taken; the final status is the last record, so it is set last. A
spool whose process still runs is left to that process. :func:`replay_all` does this for every spool
under ``outputs/``, then closes the runs of this project that a killed process left RUNNING.

A spool folder is data on disk that anyone able to write under ``outputs/`` may have written, so replay trusts
only what the user says, not what the spool says:

- where to send (:class:`Destination`): the store the user configured (``--tracking-uri`` / ``make replay
  MLFLOW_URI=``, else ``tracking.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``). A
  spool that records another store is refused, and stays as it is, unless the user says ``--to-recorded-uri``;
- what to send: only files inside the spool's own folder (:func:`~cxrtrack.tracking.spool.check_record`, every
  pending record checked before the store is called; a path out of it, a ``..`` or a link out is refused);
- when to call a store at all: never for a spool that is complete; every call bounded (MLflow's HTTP timeout and
  retries set to seconds, a server probed with one ``/health`` request before it is searched for killed runs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cxrtrack.errors import CXRError
from cxrtrack.provenance import redact
from cxrtrack.tracking.base import KILLED, display_name
from cxrtrack.tracking.mlflow_store import (
    apply_http_settings,
    close_orphans,
    is_http,
    ping,
    split_credentials,
    sqlite_path,
)
from cxrtrack.tracking.spool import Spool, SpoolError, SpoolRefused, check_record, send_record

log = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    spool: Path
    run: str = ""
    sent: int = 0
    pending_before: int = 0
    status: str = ""  # what happened, in words
    error: str | None = None
    uri: str | None = None  # the store its calls were sent to (None: no store was called)
    recorded: str | None = None  # the store the spool itself names
    refused: str | None = None  # "store": it records a store the user did not configure; "files": see SpoolRefused

    @property
    def complete(self) -> bool:
        return self.error is None and self.sent == self.pending_before


def _spool_process_alive(meta: dict) -> bool:
    import psutil

    pid = (meta.get("process") or {}).get("pid")
    if not pid or not psutil.pid_exists(pid):
        return False
    try:  # the pid may have been reused: a process created after the spool is not its owner
        from datetime import datetime

        created = datetime.fromisoformat(meta["process"]["created"]).timestamp()
        return psutil.Process(pid).create_time() <= created + 1
    except (psutil.Error, KeyError, ValueError):
        return False


def backend_for(meta: dict, tracking_uri: str | None = None):
    """A backend able to attach to the run the spool belongs to."""
    if meta.get("backend") != "mlflow":
        raise SpoolError(f"cannot replay a spool of backend {meta.get('backend')!r} (only MLflow is spooled)")
    from cxrtrack.tracking.mlflow_tracker import MLflowTracker

    cfg = dict(meta.get("tracker_cfg") or {})
    # The spool records the URI without credentials; they come from MLFLOW_TRACKING_USERNAME/PASSWORD, or from an
    # explicit URI (--tracking-uri, for a server that moved).
    cfg["tracking_uri"] = tracking_uri or meta["ref"]["tracking_uri"]
    tracker = MLflowTracker(meta.get("experiment") or "", cfg)
    tracker.tracking_uri = split_credentials(cfg["tracking_uri"])
    return tracker


def same_store(a: str, b: str) -> bool:
    """Do two tracking URIs name the same store? Credentials, a trailing ``/`` and the case of the scheme and host
    do not count; SQLite files are compared by their resolved path."""
    return _store_key(a) == _store_key(b)


def _store_key(uri: str) -> str:
    uri = str(uri).strip()
    db = sqlite_path(uri)
    if db is not None:
        return f"sqlite:{db.resolve()}"
    if is_http(uri.lower()):
        parts = urlsplit(uri)
        return urlunsplit((parts.scheme.lower(), parts.netloc.rsplit("@", 1)[-1].lower(), parts.path.rstrip("/"),
                           parts.query, ""))
    return uri.rstrip("/")


@dataclass
class Destination:
    """Where replay may send a spool: the store the user configured, whatever the spool says, unless told otherwise.

    ``override``: the user named ``configured`` on the command line (``--tracking-uri``): every spool goes there (a
    server that moved). ``to_recorded``: a spool that records another store goes to that store (``--to-recorded-uri``).
    Otherwise a spool that records another store is refused (:meth:`for_spool` returns None)."""

    configured: str
    source: str = "the configuration"  # which setting named it, for messages
    override: bool = False
    to_recorded: bool = False

    def for_spool(self, recorded: str | None) -> str | None:
        if self.override or (recorded and same_store(recorded, self.configured)):
            return self.configured
        if self.to_recorded and recorded:
            return recorded
        return None


def replay_spool(root: Path, tracking_uri: str | Destination | None = None) -> ReplayResult:
    """Send the pending records of one spool; idempotent (a second call sends nothing). ``tracking_uri``: the store
    to send to, or a :class:`Destination` that decides it from the store the spool records (``make replay``); None:
    the recorded one. A spool that is complete is not sent anywhere, and no store is called for it."""
    from filelock import Timeout

    spool = Spool(root)
    result = ReplayResult(root)
    try:
        meta = spool.meta()
        if not isinstance(meta.get("ref"), dict):
            raise SpoolRefused(f"{spool.meta_file} names no run (no 'ref')")
        result.run = f"{meta.get('run_name')} ({meta['ref'].get('run_id')})"
        pending = spool.pending()
        result.pending_before = len(pending)
        if not pending:
            result.status = "nothing to send (already complete)"
            return result
        ended = any(r.get("method") == "end_run" for r in pending)
        if not ended and _spool_process_alive(meta):  # its run is still going: that process sends the spool itself
            result.status = "left alone: its process is still running and sends it itself"
            result.pending_before = 0
            return result
        recorded = meta["ref"].get("tracking_uri")
        recorded = result.recorded = recorded if isinstance(recorded, str) and recorded else None
        if isinstance(tracking_uri, Destination):
            uri = tracking_uri.for_spool(recorded)
            if uri is None:
                result.refused = "store"
                result.error = (f"it records the store {redact(str(recorded))}, not the configured one "
                                f"({redact(tracking_uri.configured)}, named by {tracking_uri.source})")
                result.status = f"not sent: {result.error}; the spool stays as it is"
                return result
        else:
            uri = tracking_uri or recorded
            if uri is None:
                raise SpoolRefused(f"{spool.meta_file} names no store, and none was given")
        with spool.lock(timeout=0):
            pending = spool.pending()  # again, under the lock
            for record in pending:  # every file it names inside its folder, before any store is called
                check_record(spool.root, record)
            result.uri = uri
            log.info("Sending %d call(s) of %s (run %s) to %s.", len(pending), root, result.run, redact(uri))
            backend = backend_for(meta, uri)
            backend.setup()
            if not backend.ping():
                raise SpoolError(f"the store {redact(backend.tracking_uri)} does not answer")
            backend.attach(meta["ref"])
            ended = False
            try:
                for record in pending:
                    send_record(backend, spool, record)
                    spool.mark_done(record["seq"])
                    result.sent += 1
                    ended = record["method"] == "end_run"
                if not ended:  # the process died without ending its run (killed): say so in the store
                    backend.set_tags({"cxrtrack.closed_by": "make replay: the process ended without closing the run"})
                    backend.end_run(KILLED)
                    ended = True
            finally:
                if not ended:
                    backend.abandon()  # leave its status to a later replay
        final = [r["args"]["status"] for r in pending if r["method"] == "end_run"]
        result.status = f"sent {result.sent} call(s); final status {final[-1] if final else KILLED}"
    except Timeout:
        result.status, result.pending_before = "left alone: another process is sending it right now", 0
    except SpoolRefused as exc:
        result.refused, result.error = "files", str(exc)
        result.status = (f"refused, {f'only {result.sent} call(s)' if result.sent else 'nothing'} of it was sent: "
                         f"{result.error}; the spool stays as it is")
        return result
    except (SpoolError, CXRError) as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - the store failed mid-way: what was sent is marked, the rest waits
        result.error = f"{type(exc).__name__}: {redact(' '.join(str(exc).split()))[:300]}"
    if result.error:
        result.status = (f"sent {result.sent} of {result.pending_before} call(s), then stopped: {result.error}; "
                         f"run `make replay` again when the store answers")
    return result


# Where runs keep their folders below outputs/: a run, a CV's folds or a seed study's seeds (and a seed study of
# CVs), a tuning study's trials (and a CV trial's folds). A spool is <run folder>/spool/<backend>/spool.json.
RUN_FOLDERS = ("*", "*/folds/*", "*/seeds/*", "*/seeds/*/folds/*", "tune/*/*", "tune/*/*/folds/*")


def find_spools(outputs: Path) -> list[Path]:
    """Every spool folder under ``outputs``, at every depth a run folder can be (:data:`RUN_FOLDERS`)."""
    found = {p.parent for pattern in RUN_FOLDERS for p in Path(outputs).glob(f"{pattern}/spool/*/spool.json")}
    return sorted(found)


@dataclass
class ReplayReport:
    spools: list[ReplayResult] = field(default_factory=list)
    orphans: list[tuple[str, str, str]] = field(default_factory=list)  # run id, run name, action
    searched: list[str] = field(default_factory=list)  # the stores searched for runs left RUNNING
    unreachable: list[str] = field(default_factory=list)  # stores that did not answer, so were not searched

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.spools)

    @property
    def refused_store(self) -> list[ReplayResult]:
        return [r for r in self.spools if r.refused == "store"]


def replay_all(outputs: Path, destination: Destination, experiment: str | None = None,
               http: dict | None = None) -> ReplayReport:
    """Replay every spool under ``outputs`` where ``destination`` allows, then close the runs left RUNNING by killed
    processes in the configured store (and in the stores spools were sent to with ``to_recorded``; a spool that is
    complete is never a reason to call its store). ``http``: ``tracking.mlflow``'s ``http_timeout`` /
    ``http_retries`` (every request replay makes is bounded by them, unless MLFLOW_HTTP_REQUEST_* says otherwise)."""
    import mlflow

    apply_http_settings(http or {})  # before any client exists: the searches below are bounded too, not only sends
    report = ReplayReport()
    replayed: dict[Path, ReplayResult] = {}
    stores = [destination.configured]
    outputs = Path(outputs)
    for root in find_spools(outputs):
        if not root.resolve().is_relative_to(outputs.resolve()):
            result = ReplayResult(root, refused="files",
                                  error=f"the folder is a link to {root.resolve()}, outside {outputs}")
            result.status = (f"refused, nothing of it was sent: {result.error}; replay it by naming the folder it is "
                             f"in (OUTPUTS=...)")
        else:
            result = replay_spool(root, destination)
        report.spools.append(result)
        replayed[root.resolve()] = result
        if result.uri and not any(same_store(result.uri, s) for s in stores):
            stores.append(result.uri)

    def replay_tagged(path: Path) -> str:
        """A killed run's spool, found by its tag in the store: replayed under the same rules, once."""
        if path.resolve() in replayed:
            return replayed[path.resolve()].status
        result = replayed[path.resolve()] = replay_spool(path, destination)
        report.spools.append(result)
        return result.status

    for uri in stores:
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            continue  # no store there: nothing to look for (and never create one just to look)
        if is_http(uri) and not ping(uri):  # one request of 3 s at most, instead of MLflow's retries on every call
            report.unreachable.append(uri)
            log.warning("%s: %s does not answer: not searched for runs left RUNNING by killed processes (run `make "
                        "replay` again when it answers).", display_name("mlflow"), redact(uri))
            continue
        report.searched.append(uri)
        try:
            client = mlflow.MlflowClient(tracking_uri=split_credentials(uri))
            ids = [e.experiment_id for e in client.search_experiments()
                   if experiment is None or e.name == experiment]
            if ids:
                report.orphans += close_orphans(uri, ids, replay=replay_tagged, closed_by="make replay")
        except Exception as exc:  # noqa: BLE001 - one store down must not hide the others' results
            log.warning("%s: could not look for runs left RUNNING in %s (%s).", display_name("mlflow"), redact(uri),
                        redact(str(exc))[:200])
    return report

