"""Send spooled calls to their store later (``make replay``), and close runs whose process was killed.

:func:`replay_spool` re-opens the run the spool belongs to (by its id), sends the pending records in
order and marks each one as it is taken; the final status is the last record, so it is set last. A
spool whose process still runs is left to that process. :func:`replay_all` does this for every spool
under ``outputs/``, then closes the runs of this project that a killed process left RUNNING.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cxrtrack.errors import CXRError
from cxrtrack.provenance import redact
from cxrtrack.tracking.base import KILLED, display_name
from cxrtrack.tracking.spool import Spool, SpoolError, send_record

log = logging.getLogger(__name__)


@dataclass
class ReplayResult:
    spool: Path
    run: str = ""
    sent: int = 0
    pending_before: int = 0
    status: str = ""  # what happened, in words
    error: str | None = None

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
    from cxrtrack.tracking.mlflow_store import split_credentials
    from cxrtrack.tracking.mlflow_tracker import MLflowTracker

    cfg = dict(meta.get("tracker_cfg") or {})
    # The spool records the URI without credentials; they come from MLFLOW_TRACKING_USERNAME/PASSWORD, or from an
    # explicit URI (--tracking-uri, for a server that moved).
    cfg["tracking_uri"] = tracking_uri or meta["ref"]["tracking_uri"]
    tracker = MLflowTracker(meta.get("experiment") or "", cfg)
    tracker.tracking_uri = split_credentials(cfg["tracking_uri"])
    return tracker


def replay_spool(root: Path, tracking_uri: str | None = None) -> ReplayResult:
    """Send the pending records of one spool; idempotent (a second call sends nothing)."""
    from filelock import Timeout

    spool = Spool(root)
    result = ReplayResult(root)
    try:
        meta = spool.meta()
        result.run = f"{meta.get('run_name')} ({meta['ref'].get('run_id')})"
        pending = spool.pending()
        result.pending_before = len(pending)
        if not pending:
            result.status = "nothing to send (already complete)"
            return result
        ended = any(r["method"] == "end_run" for r in pending)
        if not ended and _spool_process_alive(meta):  # its run is still going: that process sends the spool itself
            result.status = "left alone: its process is still running and sends it itself"
            result.pending_before = 0
            return result
        with spool.lock(timeout=0):
            pending = spool.pending()  # again, under the lock
            backend = backend_for(meta, tracking_uri)
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
    except (SpoolError, CXRError) as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - the store failed mid-way: what was sent is marked, the rest waits
        result.error = f"{type(exc).__name__}: {redact(' '.join(str(exc).split()))[:300]}"
    if result.error:
        result.status = (f"sent {result.sent} of {result.pending_before} call(s), then stopped: {result.error}; "
                         f"run `make replay` again when the store answers")
    return result


def find_spools(outputs: Path) -> list[Path]:
    """Every spool folder under ``outputs`` (``<run>/spool/<backend>/spool.json``)."""
    return sorted(p.parent for p in Path(outputs).glob("*/spool/*/spool.json"))


@dataclass
class ReplayReport:
    spools: list[ReplayResult] = field(default_factory=list)
    orphans: list[tuple[str, str, str]] = field(default_factory=list)  # run id, run name, action

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.spools)


def replay_all(outputs: Path, tracking_uris: list[str], experiment: str | None = None,
               tracking_uri_override: str | None = None) -> ReplayReport:
    """Replay every spool under ``outputs``, then close runs left RUNNING by killed processes in each store
    (those of the spools, and ``tracking_uris``)."""
    import mlflow

    from cxrtrack.tracking.mlflow_store import close_orphans, sqlite_path

    report = ReplayReport()
    uris = list(dict.fromkeys(tracking_uris))
    for root in find_spools(outputs):
        result = replay_spool(root, tracking_uri_override)
        report.spools.append(result)
        try:
            uri = Spool(root).meta()["ref"]["tracking_uri"]
            uris.append(uri) if uri not in uris else None
        except (SpoolError, KeyError):
            pass
    for uri in uris:
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            continue  # no store there: nothing to look for (and never create one just to look)
        try:
            client = mlflow.MlflowClient(tracking_uri=uri)
            ids = [e.experiment_id for e in client.search_experiments()
                   if experiment is None or e.name == experiment]
            if ids:
                report.orphans += close_orphans(uri, ids, replay=lambda p: replay_spool(p, tracking_uri_override).status)
        except Exception as exc:  # noqa: BLE001 - one store down must not hide the others' results
            log.warning("%s: could not look for runs left RUNNING in %s (%s).", display_name("mlflow"), redact(uri),
                        redact(str(exc))[:200])
    return report
