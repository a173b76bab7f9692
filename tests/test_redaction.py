"""Fast checks of the redaction rules the secrets test (test_secrets.py) relies on, and of the opt-in defaults."""

from __future__ import annotations

import os
import subprocess
import sys

from cxrtrack.provenance import REDACTED, redact, scrub_argv, scrub_secrets


def test_urls_lose_their_credentials_and_secret_query_values(monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "t0ken-value-123")
    assert redact("http://bob:p@ss@host:5000/x?token=abc&page=2") == f"http://***@host:5000/x?token={REDACTED}&page=2"
    assert redact("using t0ken-value-123 now") == f"using {REDACTED} now"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_the_recorded_command_line_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf-secret-value")
    argv = ["--set", "tracking.tags.api_key=abc", "--set", "tracking.mlflow.tracking_uri=https://u:pw@h",
            "--set", "tracking.tags.note=uses hf-secret-value", "--epochs", "3"]
    assert scrub_argv(argv) == ["--set", f"tracking.tags.api_key={REDACTED}", "--set",
                                "tracking.mlflow.tracking_uri=https://***@h", "--set",
                                f"tracking.tags.note=uses {REDACTED}", "--epochs", "3"]
    assert scrub_secrets({"uri": "https://u:pw@h/?sig=1"}) == {"uri": f"https://***@h/?sig={REDACTED}"}


def test_wandb_error_reporting_and_mlflow_telemetry_are_opt_in():
    """Off unless the user enables them, read in a fresh interpreter (both are read when the libraries start)."""
    code = ("import os, cxrtrack.tracking, wandb.env; "
            "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], wandb.env.error_reporting_enabled())")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_ERROR_REPORTING", "MLFLOW_DISABLE_TELEMETRY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["true", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={**env, "WANDB_ERROR_REPORTING": "true"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["true", "True"], out.stderr  # the user's choice wins


def test_wandb_sees_the_scrubbed_command_line_only_during_init(monkeypatch):
    from cxrtrack.tracking.wandb_tracker import scrubbed_argv

    monkeypatch.setattr(sys, "argv", ["train.py", "--set", "tracking.tags.password=hunter2"])
    with scrubbed_argv():
        assert sys.argv == ["train.py", "--set", f"tracking.tags.password={REDACTED}"]
    assert sys.argv == ["train.py", "--set", "tracking.tags.password=hunter2"]
