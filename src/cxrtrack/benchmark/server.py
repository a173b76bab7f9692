"""A real ``mlflow server`` on 127.0.0.1 for the duration of a ``with`` block: the one ``make compare`` measures
and the one the tests run against (outages, concurrency, secrets, scale-out).

It listens on a free port, stores everything under the folder it is given, and is stopped on exit,
on an exception and on Ctrl-C (its whole process group, so no worker is left behind). The tests also kill it
(SIGKILL), pause it (SIGSTOP: it accepts connections and never answers), resume it and start it again on the
same port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
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
                 backend_store_uri: str | None = None):
        self.folder = Path(folder)
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
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
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
