"""A real ``mlflow server`` on 127.0.0.1 for the duration of a ``with`` block: the one ``make compare`` measures
and the one the tests run against (outages, concurrency, secrets, scale-out). :class:`PostgreSQL` is a throwaway
PostgreSQL cluster in a temporary folder, the database a team's server runs on (``make compare SCALE=1``).

It listens on a free port, stores everything under the folder it is given, and is stopped on exit,
on an exception and on Ctrl-C (its whole process group, so no worker is left behind). The tests also kill it
(SIGKILL), pause it (SIGSTOP: it accepts connections and never answers), resume it and start it again on the
same port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cxrtrack.errors import CXRError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MLflowServer:
    """``with MLflowServer(folder) as server: server.uri`` -> ``http://127.0.0.1:<port>``."""

    def __init__(self, folder: str | Path, port: int | None = None, start_timeout: float = 90.0,
                 backend_store_uri: str | None = None, workers: int = 1):
        self.folder = Path(folder)
        self.workers = workers
        self.backend_store_uri = backend_store_uri  # None: its own sqlite file in ``folder``
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.start_s: float | None = None  # seconds until the server answered

    def __enter__(self) -> MLflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> MLflowServer:
        """Start the server (again, after :meth:`stop` or :meth:`kill`: same port, same store); returns once it
        answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow) if mlflow.exists() else "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri or f"sqlite:///{(self.folder / 'server.db').resolve()}",
            "--artifacts-destination", str((self.folder / "server-artifacts").resolve()),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
               # no background job runners (8 processes of ~240 MB each, for GenAI jobs this project never uses)
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        start = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # own process group: stop() kills its workers too
        deadline = start + self.start_timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise CXRError(f"mlflow server exited at start (code {self.process.returncode}); see "
                               f"{self.folder / 'server.log'}.")
            if self.healthy():
                self.start_s = time.perf_counter() - start
                return self
            time.sleep(0.25)
        self.stop()
        raise CXRError(f"mlflow server did not answer on {self.uri} within {self.start_timeout:.0f} s; see "
                       f"{self.folder / 'server.log'}.")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server and every process it started (its process group): SIGTERM, then SIGKILL after 15 s;
        ``kill``: SIGKILL at once, a crash. Returns once its port is free for a restart."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)  # workers that outlived it too
            self.process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self._log.close()
        self.process = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    time.sleep(0.2)
            except OSError:
                return

    def kill(self) -> None:
        self.stop(kill=True)

    def _pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the MLflow server was not started")
        return self.process.pid

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections and never answers (a hung store)."""
        os.killpg(self._pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self._pid(), signal.SIGCONT)


class PostgreSQL:
    """``with PostgreSQL() as pg: pg.uri`` -> ``postgresql+psycopg://postgres@127.0.0.1:<port>/mlflow``: a new cluster
    (``initdb``) in a temporary folder under /tmp, listening on a free port of 127.0.0.1 only, removed on exit.
    PostgreSQL refuses to run as root: as root its tools run as the ``postgres`` user (``runuser``)."""

    def __init__(self, database: str = "mlflow", fsync: bool = True, start_timeout: float = 60.0):
        self.database, self.fsync, self.start_timeout = database, fsync, start_timeout
        self.port = free_port()
        self.uri = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None

    @staticmethod
    def bindir() -> Path | None:
        """The newest installed PostgreSQL's binaries (Debian's layout), or None."""
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(found[-1]).parent if found else None

    @staticmethod
    def unavailable() -> str | None:
        """Why a cluster cannot be started here, or None."""
        if PostgreSQL.bindir() is None:
            return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
        if os.geteuid() == 0 and not shutil.which("runuser"):
            return "running as root without runuser: PostgreSQL must run as a non-root user"
        return None

    def __enter__(self) -> PostgreSQL:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def start(self) -> PostgreSQL:
        reason = self.unavailable()
        if reason:
            raise CXRError(reason)
        bindir = self.bindir()
        assert bindir is not None
        self.folder = Path(tempfile.mkdtemp(prefix="cxrtrack-pg-"))  # /tmp: the postgres user can reach it
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        subprocess.run(self._as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                       "--no-sync"]), check=True, capture_output=True, timeout=120)
        settings = ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
                    *(["-c", "fsync=off"] if not self.fsync else [])]
        self.process = subprocess.Popen(
            self._as_owner([str(bindir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.folder),
                            *settings]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(bindir)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        self.database], check=True, capture_output=True, timeout=60)
        return self

    def _wait_ready(self, bindir: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if self.process is None or self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise CXRError(f"PostgreSQL did not start on 127.0.0.1:{self.port}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGINT (PostgreSQL's fast shutdown: clients are disconnected), SIGKILL after 30 s; then its folder is
        removed."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
