"""A real `mlflow server` on 127.0.0.1 for the outage and concurrency tests: started, killed (SIGKILL to its
whole process group), paused (SIGSTOP: it accepts connections and never answers) and restarted on the same port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        # No GenAI job runner (8 extra processes of ~240 MB each): these tests need only the tracking API.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.root / f"server-{self.starts}.log", "w")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / f'server-{self.starts - 1}.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server and every process it started (its own process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        elif self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived the parent
            except ProcessLookupError:
                pass
        self.proc = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the port is free again before anyone restarts on it
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    time.sleep(0.2)
            except OSError:
                return

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)
