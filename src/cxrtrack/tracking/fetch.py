"""Find the training checkpoint behind a model reference, for ``make evaluate MODEL=...``.

Accepted references:

- a checkpoint file: ``outputs/<run>/checkpoints/best.pt``
- an MLflow registry reference: ``models:/CustomCXRNet@champion``, ``models:/CustomCXRNet@latest-kaggle``,
  ``models:/CustomCXRNet/3`` (the logged model carries the checkpoint as an extra file)
- a W&B model artifact: ``wandb:<entity>/<project>/customcxrnet:champion`` (or ``:v3``, ``:latest``), fetched
  from the W&B server (online only)
- an MLflow run id (32 hex digits): that run's ``checkpoints/best.pt`` artifact
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from cxrtrack.errors import CXRError

RUN_ID = re.compile(r"[0-9a-f]{32}")
WANDB_PREFIX = "wandb:"


def kind_of(ref: str) -> str:
    """``checkpoint`` | ``mlflow-model`` | ``wandb-artifact`` | ``mlflow-run``; a bad reference is a CXRError."""
    if ref.startswith("models:/"):
        return "mlflow-model"
    if ref.startswith(WANDB_PREFIX):
        return "wandb-artifact"
    if Path(ref).exists() or ref.endswith(".pt"):
        return "checkpoint"
    if RUN_ID.fullmatch(ref):
        return "mlflow-run"
    raise CXRError(
        f"Cannot tell what {ref!r} is. Pass a checkpoint file (outputs/<run>/checkpoints/best.pt), "
        f"a registry reference (models:/CustomCXRNet@champion), "
        f"a W&B artifact (wandb:<entity>/<project>/customcxrnet:champion) or an MLflow run id (32 hex digits)."
    )


def mlflow_model_checkpoint(ref: str, tracking_uri: str, dest: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of a registered version (``models:/name@alias`` or ``models:/name/version``), and the
    version's run id and tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    body = ref.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, number = body.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise CXRError(f"{ref} names no version: add @<alias> (models:/{body}@champion) or /<version>.")
        dst = str(dest or tempfile.mkdtemp(prefix="cxrtrack-model-"))
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                        tracking_uri=tracking_uri, dst_path=dst))
    except MlflowException as exc:
        raise CXRError(
            f"Could not find {ref} in the MLflow registry at {tracking_uri} ({' '.join(str(exc).split())[:300]}). "
            f"List the versions and aliases in `make mlflow-ui` (Models tab), or check MLFLOW_TRACKING_URI."
        ) from None
    found = sorted(path.rglob("best.pt"))
    info = {"run_id": version.run_id, "name": name, "version": str(version.version), "tags": dict(version.tags)}
    if found:
        return found[0], info
    if version.run_id:  # a version logged before the checkpoint rode along: the run's artifact
        from cxrtrack.tracking.mlflow_store import download_checkpoint

        return download_checkpoint(version.run_id, tracking_uri, dst), info
    raise CXRError(f"{ref} (version {version.version}) holds no training checkpoint "
                   "and names no run to fetch one from.")


def wandb_artifact_checkpoint(ref: str, dest: str | Path | None = None, api=None) -> tuple[Path, dict[str, Any]]:
    """The ``best.pt`` of a W&B model artifact (online: downloaded through the W&B API)."""
    name = ref.removeprefix(WANDB_PREFIX)
    if ":" not in name:
        name += ":latest"
    try:
        if api is None:
            import wandb

            api = wandb.Api()
        artifact = api.artifact(name, type="model")
        folder = Path(artifact.download(root=str(dest or tempfile.mkdtemp(prefix="cxrtrack-wandb-"))))
    except Exception as exc:  # noqa: BLE001 - W&B raises several types for "not found" and "no network"
        raise CXRError(
            f"Could not fetch the W&B artifact {name} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). "
            f"It needs the W&B server (an API key and network; offline runs must be uploaded with `make wandb-sync` "
            f"first). "
            f"Offline, evaluate the run's checkpoint instead: MODEL=outputs/<run>/checkpoints/best.pt."
        ) from None
    path = folder / "best.pt"
    if not path.is_file():
        raise CXRError(f"The W&B artifact {name} holds no best.pt; it is not a model artifact of this project.")
    try:
        run = artifact.logged_by()
    except Exception:  # noqa: BLE001 - only used to report back to the run that logged it
        run = None
    return path, {"artifact": name, "metadata": dict(artifact.metadata or {}), "run_id": getattr(run, "id", None),
                  "run_path": "/".join(getattr(run, "path", []) or []) or None}


def missing_checkpoint(path: str | Path) -> CXRError:
    return CXRError(f"Checkpoint {path} does not exist. Train first (`make mlflow-quick`), then pass the run's "
                    f"outputs/<run>/checkpoints/best.pt, or pass RUN_ID=<mlflow run id>.")


def resolve(ref: str, tracking_uri: str | None = None, kind: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(checkpoint file, what it came from) for any accepted reference (``kind`` when the caller knows it).
    A checkpoint file that is not there is said here, before the caller imports torch (~5 s)."""
    from cxrtrack.tracking.mlflow_store import resolve_tracking_uri

    kind = kind or kind_of(ref)
    if kind == "checkpoint":
        if not Path(ref).is_file():
            raise missing_checkpoint(ref)
        return Path(ref), {"kind": kind}
    if kind == "wandb-artifact":
        path, info = wandb_artifact_checkpoint(ref)
        return path, {"kind": kind, **info}
    uri = resolve_tracking_uri(tracking_uri)
    if kind == "mlflow-model":
        path, info = mlflow_model_checkpoint(ref, uri)
        return path, {"kind": kind, "tracking_uri": uri, **info}
    from cxrtrack.tracking.mlflow_store import download_checkpoint

    return download_checkpoint(ref, uri), {"kind": kind, "tracking_uri": uri, "run_id": ref}
