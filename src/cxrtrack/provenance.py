"""Run provenance: secret scrubbing, git state and environment tags recorded with every run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REDACTED = "***REDACTED***"
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|auth)", re.IGNORECASE)
# user:password@ in a URL; greedy up to the last "@" of the authority, so a password holding "@" is masked whole
_URL_CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s?#]*@", re.IGNORECASE)
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# A query parameter whose name looks like a credential: ?token=..., &api_key=..., &sig=... (not the MLflow UI's
# viewStateShareKey, the name of a shared chart layout stored in the experiment: the project prints it)
_URL_QUERY_SECRET = re.compile(r"([?&](?!viewStateShareKey=)[^=&#\s]*"
                               r"(?:key|token|secret|password|passwd|credential|auth|sig)"
                               r"[^=&#\s]*=)[^&#\s]+", re.IGNORECASE)


def _secret_values() -> set[str]:
    """Values of secret-looking environment variables (WANDB_API_KEY, KAGGLE_KEY, *_TOKEN, ...)."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}


def scrub_secrets(obj: Any, _secrets: set[str] | None = None) -> Any:
    """Copy of a nested config with secrets replaced by ``***REDACTED***``.

    A value is a secret when its key looks like one (``api_key``, ``token``, ``password``, ...) or
    when it contains the value of a secret-looking environment variable; credentials inside a URL
    (``https://user:pass@host``) are masked.
    """
    secrets = _secret_values() if _secrets is None else _secrets
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else scrub_secrets(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v, secrets) for v in obj)
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    if isinstance(obj, str):  # https://user:password@host -> https://***@host; ?token=... masked
        return _URL_QUERY_SECRET.sub(r"\1" + REDACTED, _URL_CREDENTIALS.sub(r"\1***@", obj))
    return obj


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with URL credentials (``https://user:pass@host``, ``?token=...``) and the values of secret
    environment variables masked. For anything the project prints or hands to a tracker as free text."""
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    text = _URL_QUERY_SECRET.sub(r"\1" + REDACTED, text)
    for secret in sorted(_secret_values() if secrets is None else set(secrets), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def scrub_argv(argv: Iterable[str]) -> list[str]:
    """A command line safe to record: ``key=value`` arguments whose key looks secret lose their value,
    URLs lose their credentials, values of secret environment variables are masked."""
    secrets = _secret_values()
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if sep and _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            arg = f"{key}={REDACTED}"
        out.append(redact(arg, secrets))
    return out


class RedactingFilter:
    """A logging filter that masks credentials in every record it sees (attach it to a handler, so that
    the records of MLflow, W&B and the project are all redacted before they reach the terminal)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def git_info(cwd: Path | None = None) -> dict[str, str]:
    """``git_commit`` and ``git_dirty`` of the working tree (``unknown`` outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def environment_tags(device: str) -> dict[str, str]:
    """Versions and device: what a reader needs to reproduce or compare a run."""
    import torch

    tags = {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "device": device,
        "platform": platform.platform(terse=True),
    }
    for package in ("mlflow", "wandb", "torchvision"):
        try:  # read the installed version without importing the (slow to import) package
            tags[f"{package}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags
