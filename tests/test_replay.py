"""`make replay` trusts the user, not the spool folder: a spool under outputs/ is data anyone able to write there may
have crafted. It is sent only to the store the user configured (a spool that records another store is refused, and
kept, unless TO_RECORDED_URI=1 / MLFLOW_URI= says otherwise), only the files inside its own folder are sent, a spool
that is complete makes no call to any store, and every call replay makes is bounded (a dead server costs seconds).

Real stores: SQLite stores and a real `mlflow server` on 127.0.0.1; a port where nothing listens for a dead server;
a plain TCP listener that counts the connections it gets for "not contacted"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cxrtrack.benchmark.server import free_port
from cxrtrack.tracking.spool import Spool
from tests.conftest import ROOT

SECRET = "s3cret-outside-the-spool"
NO_PROCESS = 2**22 + 1  # above Linux's largest pid: the process that wrote the spool is gone


def write_spool(root: Path, uri: str, run_id: str = "0" * 32, experiment_id: str = "1",
                artifact: str | None = "files/000002/path/history.json", done: bool = False) -> Spool:
    """A spool folder as a run killed during an outage leaves it (or as someone crafts it): spool.json naming its
    store and run, a journal of log_metrics, log_artifact (``artifact``: the path the record names) and end_run."""
    root.mkdir(parents=True)
    (root / "spool.json").write_text(json.dumps({
        "version": 2, "backend": "mlflow", "run_name": "run-x", "experiment": "x", "tracker_cfg": {},
        "ref": {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id},
        "process": {"pid": NO_PROCESS, "created": "2026-12-06T10:48:35+00:00"}}))
    (root / "files" / "000002" / "path").mkdir(parents=True)
    (root / "files" / "000002" / "path" / "history.json").write_text('{"epochs": [1]}')
    records = [{"seq": 1, "method": "log_metrics", "time_ms": 1796554115353,
                "args": {"metrics": {"loss": 0.5}, "step": 1, "timestamp_ms": 1796554115353}}]
    if artifact is not None:
        records.append({"seq": 2, "method": "log_artifact", "time_ms": 1796554115360,
                        "args": {"path": artifact, "artifact_path": "loot"}})
    records.append({"seq": 3, "method": "end_run", "time_ms": 1796554115400, "args": {"status": "FINISHED"}})
    (root / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        done_lines = (json.dumps({"seq": r["seq"], "time_ms": 1}) + "\n" for r in records)
        (root / "replayed.jsonl").write_text("".join(done_lines))
    return Spool(root)


def new_run(uri: str, artifacts: Path) -> tuple[str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("x", artifact_location=artifacts.as_uri() if artifacts else None)
    return experiment_id, client.create_run(experiment_id, run_name="run-x").info.run_id


HTTP_VARS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture(autouse=True)
def mlflow_http_defaults(monkeypatch):
    """MLflow's own HTTP defaults, as a user's shell has them: an in-process replay sets bounded ones in os.environ
    (setdefault), and must neither hide the defect from a later `make replay` here nor leak into other tests."""
    for var in HTTP_VARS:
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)


def replay(*variables: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in HTTP_VARS}
    return subprocess.run(["make", "-s", "replay", *variables], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**clean, **env})


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- what is sent: only files inside the spool's own folder ------------------------------------------------------

def crafted_path(kind: str, root: Path, outside: Path) -> str:
    if kind == "absolute":
        return str(outside)
    if kind == "dotdot":
        return os.path.relpath(outside, root)  # ../../../secret.txt
    link = root / "files" / "000002" / "path" / "loot.txt"  # a link inside the folder that points out of it
    link.symlink_to(outside)
    return "files/000002/path/loot.txt"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_a_spool_naming_a_file_outside_its_folder_sends_nothing_and_stays(tmp_path, kind, migrated_mlflow_db):
    outside = tmp_path / "home" / "secret.txt"
    outside.parent.mkdir()
    outside.write_text(SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, run_id = new_run(uri, tmp_path / "mlartifacts")
    root = tmp_path / "outputs" / "x" / "spool" / "mlflow"
    spool = write_spool(root, uri, run_id, experiment_id, artifact="PLACEHOLDER")
    journal = spool.journal.read_text().replace("PLACEHOLDER", crafted_path(kind, root, outside).replace("\\", "/"))
    spool.journal.write_text(journal)

    from cxrtrack.tracking.replay import replay_spool

    result = replay_spool(root)
    assert not result.complete and result.sent == 0, result
    assert "outside its own folder" in result.status and "stays" in result.status, result.status
    stored = [p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    assert not any(SECRET in p.read_text(errors="replace") for p in stored)
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.metrics == {} and run.info.status == "RUNNING"  # checked before the store was called at all
    assert len(spool.pending()) == 3  # nothing lost: the spool is as it was


@pytest.mark.slow
def test_make_replay_of_the_issues_crafted_spool_uploads_nothing(tmp_path, migrated_mlflow_db):
    """The issue's reproduction: outputs/x/spool/mlflow with {"method": "log_artifact", "args": {"path":
    "/any/file/outside", "artifact_path": "loot"}}, replayed with `make replay` into the configured store."""
    outside = tmp_path / "secret.txt"
    outside.write_text(SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, run_id = new_run(uri, tmp_path / "mlartifacts")
    root = tmp_path / "outputs" / "x" / "spool" / "mlflow"
    spool = write_spool(root, uri, run_id, experiment_id, artifact=str(outside))
    proc = replay(f"OUTPUTS={tmp_path / 'outputs'}", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "0 call(s) sent" in proc.stdout and "outside its own folder" in proc.stdout, proc.stdout
    assert "Refused: 1 spool(s) name a file outside their own folder" in proc.stderr, proc.stderr
    assert [p for p in files_under(tmp_path / "mlartifacts") if "loot" in p] == []
    assert len(spool.pending()) == 3


# -- where it is sent: only the store the user configured ---------------------------------------------------------

@pytest.mark.slow
def test_a_spool_recording_another_store_is_refused_and_kept_until_the_user_confirms_it(tmp_path, migrated_server):
    """The spool names a real server; the user's configured store is another one (MLFLOW_TRACKING_URI). `make
    replay` prints where it sends, refuses that spool with one paragraph naming the fix, exits non-zero and sends
    nothing; with TO_RECORDED_URI=1 the same spool reaches the server it records, and then it is complete."""
    import mlflow

    with migrated_server(tmp_path / "server") as server:
        experiment_id, run_id = new_run(server.uri, None)
        root = tmp_path / "outputs" / "x" / "spool" / "mlflow"
        spool = write_spool(root, server.uri, run_id, experiment_id)
        configured = f"sqlite:///{tmp_path / 'mine.db'}"
        env = {"MLFLOW_TRACKING_URI": configured}

        refused = replay(f"OUTPUTS={tmp_path / 'outputs'}", env=env)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"Replay sends to {configured} (named by the MLFLOW_TRACKING_URI environment variable)" in refused.stdout
        assert "0 call(s) sent" in refused.stdout, refused.stdout
        message = " ".join(refused.stderr.split())
        assert f"Not sent: 1 spool(s) record a store other than the configured one, {configured}" in message, message
        assert f"{root} records {server.uri}" in message and "make replay TO_RECORDED_URI=1" in message, message
        assert "MLFLOW_URI=" in message and "each stays as it is" in message, message
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        run = client.get_run(run_id)
        assert run.data.metrics == {} and run.info.status == "RUNNING"  # the server got nothing
        assert len(spool.pending()) == 3 and not (tmp_path / "mine.db").exists()

        confirmed = replay(f"OUTPUTS={tmp_path / 'outputs'}", "TO_RECORDED_URI=1", env=env)
        assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
        assert "3 call(s) sent" in confirmed.stdout, confirmed.stdout
        run = client.get_run(run_id)
        assert run.data.metrics == {"loss": 0.5} and run.info.status == "FINISHED"
        assert spool.pending() == []

        again = replay(f"OUTPUTS={tmp_path / 'outputs'}", env=env)  # complete: nothing to refuse, nothing sent
        assert again.returncode == 0 and "0 call(s) sent" in again.stdout, again.stdout + again.stderr


# -- when a store is called: never for a complete spool; every call bounded ---------------------------------------

class CountingListener:
    """A TCP port that accepts connections, counts them and closes them at once (no HTTP answer)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.mark.slow
def test_a_complete_spool_makes_no_call_to_the_store_it_names(tmp_path):
    """An old spool, long complete, naming a server: `make replay` does not contact it at all (before, it searched
    that server for killed runs with MLflow's default retries: ~4 min per dead server, every time)."""
    listener = CountingListener()
    try:
        write_spool(tmp_path / "outputs" / "old" / "spool" / "mlflow", listener.uri, done=True)
        # MLflow's retries cut short only so that a contact (the defect) fails fast instead of stalling minutes
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
        for flags in ([], ["TO_RECORDED_URI=1"]):
            proc = replay(f"OUTPUTS={tmp_path / 'outputs'}", *flags, env=env)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "nothing to send (already complete)" in proc.stdout, proc.stdout
            assert listener.connections == 0, (flags, proc.stdout, proc.stderr)
    finally:
        listener.close()
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_a_dead_configured_server_is_reported_in_seconds_not_searched_for_minutes(tmp_path):
    """The configured store is a server where nothing listens: replay probes it once and says it did not answer
    (before, the search for killed runs used MLflow's default retries, ~4 min). The time is printed, not asserted."""
    (tmp_path / "outputs").mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    proc = replay(f"OUTPUTS={tmp_path / 'outputs'}", env={"MLFLOW_TRACKING_URI": dead}, timeout=150)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{dead} did not answer, so it was not searched" in proc.stdout, proc.stdout
    print(f"\n[figures] make replay with a dead configured server: {elapsed:.1f} s")


# -- the folder, and what a closed run says ----------------------------------------------------------------------

def test_make_replay_of_a_missing_folder_is_an_error(tmp_path):
    proc = replay(f"OUTPUTS={tmp_path / 'no-such-folder'}",
                  env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"The folder {tmp_path / 'no-such-folder'}" in message and "does not exist" in message, message
    assert "make replay OUTPUTS=<folder>" in message and "spool(s)" not in proc.stdout


def test_same_store_ignores_credentials_case_and_a_trailing_slash(tmp_path, monkeypatch):
    from cxrtrack.tracking.replay import Destination, same_store

    monkeypatch.chdir(tmp_path)
    assert same_store("http://Bob:pw@Host:5000/", "http://host:5000")
    assert same_store("sqlite:///mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not same_store("http://host:5000", "http://host:5001")
    assert not same_store("http://evil.example:5000", "sqlite:///mlflow.db")
    mine = Destination("http://host:5000")
    assert mine.for_spool("http://host:5000/") == "http://host:5000" and mine.for_spool("http://evil:1") is None
    assert Destination("http://host:5000", to_recorded=True).for_spool("http://other:1") == "http://other:1"
    assert Destination("http://new:5000", override=True).for_spool("http://old:5000") == "http://new:5000"


def test_spools_of_folds_seeds_and_tuning_trials_are_found(tmp_path):
    """`make mlflow-train` is a cross-validation: an outage during it spools inside outputs/<cv>/folds/<fold>/, and
    a tuning trial's inside outputs/tune/<study>/<trial>/. `make replay` looked one level down only."""
    from cxrtrack.tracking.replay import find_spools

    runs = ["run", "cv/folds/cv-fold1", "st/seeds/st-seed42", "st/seeds/st-seed43/folds/st-seed43-fold2",
            "tune/study/trial-000", "tune/study/trial-001/folds/trial-001-fold1"]
    for run in runs:
        (tmp_path / run / "spool" / "mlflow").mkdir(parents=True)
        (tmp_path / run / "spool" / "mlflow" / "spool.json").write_text("{}")
    assert find_spools(tmp_path) == sorted(tmp_path / run / "spool" / "mlflow" for run in runs)


@pytest.mark.parametrize(("status", "up"), [(200, True), (502, False), (503, False)])
def test_only_a_healthy_health_answer_counts_as_the_server_being_up(status, up):
    """A proxy in front of a dead MLflow server answers /health with 502/503: counting any answer as "up" made every
    reconnect attempt (every 15 s) pay the client's retries against the dead server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cxrtrack.tracking.mlflow_store import ping

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK" if status == 200 else b"Bad Gateway")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert ping(f"http://127.0.0.1:{server.server_port}", timeout=3) is up
    finally:
        server.shutdown()
