"""Read a run back from what a tracker stored, and diff it against what the trainer sent.

One :class:`RunRecord` shape serves both sides:

- the tracker group records what a run *sent* (``group.record``, written as ``outputs/<run>/tracked.json``);
- :func:`read_mlflow` reads a run from an MLflow store through ``MlflowClient``;
- :func:`read_wandb` reads an offline W&B run through ``wandb leet inspect --json`` (the only way to
  read an offline run without the W&B server);
- :func:`diff_records` compares them, item by item: logged, found, missing, mismatched.

The tests and ``make compare`` both use this module, so "the store holds what the trainer computed" is
checked by one piece of code.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# MLflow metrics that MLflow records by itself (system metrics), not sent by the trainer.
_SYSTEM_PREFIX = "system/"
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow keeps of one param value (longer values are cut by the tracker)


@dataclass
class RunRecord:
    """A run as plain data: what was sent to a tracker, or what a tracker stored."""

    name: str = ""
    status: str = ""  # FINISHED | FAILED | KILLED (W&B: finished/failed mapped through the exit code)
    params: dict[str, Any] = field(default_factory=dict)  # flat "data.image_size" -> value
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    summary: dict[str, float] = field(default_factory=dict)  # final numbers (best_*, test/*)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files, by their path in the run
    images: list[str] = field(default_factory=list)  # images, by name (plots/roc_curves.png)
    tables: dict[str, int] = field(default_factory=dict)  # table name -> rows
    models: list[str] = field(default_factory=list)  # logged models / model artifacts
    system_metrics: list[str] = field(default_factory=list)  # system metric names (stores only)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (ids, sizes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)
        data["metrics"] = {k: [(int(s), float(v)) for s, v in pts] for k, pts in data["metrics"].items()}
        return cls(**data)


# -- MLflow -------------------------------------------------------------------------------------------


def _mlflow_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for info in client.list_artifacts(run_id, path):
        out += _mlflow_artifacts(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def read_mlflow(tracking_uri: str, run_id: str, epoch_metrics: list[str] | None = None) -> RunRecord:
    """Everything a run holds in an MLflow store: params, every metric at every step, tags, artifacts,
    the predictions table, logged models. ``epoch_metrics`` names the per-epoch keys (the others are
    the summary); by default a metric with more than one step, or a step > 0, is per-epoch."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    metrics: dict[str, list[tuple[int, float]]] = {}
    summary: dict[str, float] = {}
    system = []
    for key in run.data.metrics:
        if key.startswith(_SYSTEM_PREFIX):
            system.append(key)
            continue
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        per_epoch = key in epoch_metrics if epoch_metrics is not None else (len(points) > 1 or points[0][0] > 0)
        if per_epoch:
            metrics[key] = points
        else:
            summary[key] = points[-1][1]
    artifacts = _mlflow_artifacts(client, run_id)
    tables = {}  # mlflow.log_table records its tables in this tag
    for entry in json.loads(run.data.tags.get("mlflow.loggedArtifacts", "[]")):
        if entry.get("type") == "table":
            local = client.download_artifacts(run_id, entry["path"])
            tables[entry["path"].removesuffix(".json")] = len(json.loads(Path(local).read_text())["data"])
    models = [m.name for m in client.search_logged_models(  # the client's store, not the global one
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")]
    return RunRecord(
        name=run.info.run_name,
        status=run.info.status,
        params=dict(run.data.params),
        metrics=metrics,
        summary=summary,
        tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        artifacts=sorted(p for p in artifacts if not p.endswith(".png") and p.removesuffix(".json") not in tables),
        images=sorted(p for p in artifacts if p.endswith(".png")),
        tables=tables,
        models=models,
        system_metrics=sorted(system),
        extra={"run_id": run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri,
               "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
               "registered_versions": [f"{v.name} v{v.version}"
                                       for v in client.search_model_versions(f"run_id='{run_id}'")],
               "dataset_inputs": [d.dataset.name for d in (run.inputs.dataset_inputs if run.inputs else [])]},
    )


# -- W&B (offline) ------------------------------------------------------------------------------------


def _wandb_core() -> Path | None:
    """W&B's ``wandb-core`` program (in the installed package's ``bin/``), found without importing wandb."""
    spec = importlib.util.find_spec("wandb")
    core = Path(spec.origin).parent / "bin" / "wandb-core" if spec and spec.origin else None
    return core if core is not None and core.is_file() else None


# workaround(wandb): offline runs have no read API (wandb.Api needs the server) and no summary/config JSON
# on disk; the transaction log is read through the `wandb leet inspect --json` command
def wandb_leet(run_dir: str | Path, *flags: str, timeout: float = 120) -> str:
    """``wandb leet inspect --json`` of a local run folder (``wandb/offline-run-*``)."""
    run_dir = Path(run_dir)
    run_files = sorted(run_dir.glob("run-*.wandb"))
    core = _wandb_core()
    if core is not None and len(run_files) == 1:
        # workaround(wandb): `wandb leet inspect <run dir>` is a Python command (~0.7 s: it imports wandb) that only
        # runs `wandb-core leet inspect ... --run-file <its .wandb> <wandb dir>`; that program alone answers in
        # ~0.01 s, and a trainer reads its offline run back once at the end (tracking.wandb.verify_offline). The
        # same arguments as the command builds (wandb 0.31, wandb/cli/leet.py), with --no-observability: reading
        # a local file sends nothing anywhere. Any other folder goes through the command itself.
        command = [str(core), "leet", "inspect", "--no-observability", *flags, "--json",
                   "--run-file", str(run_files[0].resolve()), str(run_dir.resolve().parent)]
    else:
        wandb = Path(sys.executable).with_name("wandb")
        command = [str(wandb) if wandb.exists() else "wandb", "leet", "inspect", *flags, "--json", str(run_dir)]
    # cwd: the wandb CLI writes wandb/debug-cli.*.log into its working directory
    return subprocess.run(command, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout,
                          check=True).stdout


def _flatten(d: Mapping[str, Any], sep: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and "_type" not in value:
            out.update(_flatten(value, sep, name))
        else:
            out[name] = value
    return out


_WANDB_STATUS = {0: "FINISHED", 130: "KILLED", 143: "KILLED"}


def read_wandb(run_dir: str | Path, step_key: str = "epoch") -> RunRecord:
    """Everything an offline W&B run holds, read with ``wandb leet inspect``: config, every history row,
    summary, images, tables, artifacts (files of the ``run-files`` artifact, model artifacts)."""
    records = [json.loads(line) for line in wandb_leet(run_dir).splitlines() if line.strip()]
    info = json.loads(wandb_leet(run_dir, "--summary"))
    config = dict(info.get("config") or {})
    tags = config.pop("run_tags", {}) or {}
    metrics: dict[str, list[tuple[int, float]]] = {}
    images, tables = set(), {}
    for r in records:
        if r["type"] != "history":
            continue
        item = r["history"]["item"]
        flat = {k: v for k, v in item.items() if not k.startswith("_")}
        for key, value in flat.items():
            if key.endswith("._type"):
                name, kind = key.removesuffix("._type"), value
                if kind in ("image-file", "images/separated"):
                    images.add(name)
                elif kind == "table-file":
                    tables[name] = int(flat.get(f"{name}.nrows", 0))
        step = item.get(step_key)
        if step is None:
            continue
        for key, value in flat.items():
            if key != step_key and "." not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(key, []).append((int(step), float(value)))
    artifacts, models, aliases, datasets = [], [], {}, []
    for r in records:
        if r["type"] != "artifact":
            continue
        art = r["artifact"]
        if art["type"] == "dataset":
            datasets.append(art["name"])
        elif art["type"] == "model":
            models.append(art["name"])
            aliases[art["name"]] = art.get("aliases", [])
        elif art["type"] == "run-files":
            artifacts += [c["path"] for c in art["manifest"]["contents"]]
    summary_flat = _flatten(info.get("summary") or {}, "/")
    summary = {k: v for k, v in summary_flat.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in metrics and k != step_key
               and not k.startswith("_")}
    system = sorted({k for r in records if r["type"] == "stats" for k in r["stats"]["item"]})
    run_info: dict[str, Any] = next((r["run"] for r in records if r["type"] == "run"), {})
    status = summary_flat.get("status") or _WANDB_STATUS.get(info.get("exit_code"), "FAILED")
    return RunRecord(
        name=info.get("name", ""),
        status=status,
        params=_flatten(config, "."),
        metrics={k: sorted(v) for k, v in metrics.items()},
        summary=summary,
        tags={str(k): str(v) for k, v in tags.items()},
        artifacts=sorted(artifacts),
        images=sorted(f"{name}.png" for name in images),
        tables=tables,
        models=models,
        system_metrics=system,
        extra={"run_dir": str(run_dir), "state": info.get("state"), "exit_code": info.get("exit_code"),
               "group": run_info.get("run_group"), "job_type": run_info.get("job_type"), "model_aliases": aliases,
               "record_types": sorted({r["type"] for r in records}), "dataset_artifacts": datasets},
    )


# -- the diff -----------------------------------------------------------------------------------------


@dataclass
class Section:
    logged: int = 0
    found: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return len(self.missing) + len(self.mismatched)


def _same(sent: Any, stored: Any, *, as_text: bool) -> bool:
    if as_text:  # MLflow keeps params as text
        text = "None" if sent is None else str(sent)
        if len(text) > MLFLOW_PARAM_LIMIT:
            text = text[: MLFLOW_PARAM_LIMIT - 3] + "..."
        return text == stored
    if isinstance(sent, float) or isinstance(stored, float):
        if not isinstance(stored, (int, float)) or not isinstance(sent, (int, float)):
            return False
        if math.isnan(sent) and math.isnan(stored):
            return True
        return math.isclose(sent, stored, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(sent, (list, tuple)) and isinstance(stored, (list, tuple)):
        return len(sent) == len(stored) and all(_same(a, b, as_text=False) for a, b in zip(sent, stored, strict=True))
    return sent == stored


def _compare_map(sent: Mapping[str, Any], stored: Mapping[str, Any], *, as_text: bool = False,
                 skip=lambda k, v: False) -> Section:
    section = Section()
    for key, value in sent.items():
        if skip(key, value):
            continue
        section.logged += 1
        if key not in stored:
            section.missing.append(key)
        elif not _same(value, stored[key], as_text=as_text):
            section.mismatched.append(f"{key}: sent {value!r}, stored {stored[key]!r}")
        else:
            section.found += 1
    return section


def _compare_set(sent: list[str], stored: list[str]) -> Section:
    have = set(stored)
    missing = [x for x in sent if x not in have]
    return Section(logged=len(sent), found=len(sent) - len(missing), missing=missing)


def diff_records(sent: RunRecord, stored: RunRecord, backend: str) -> dict[str, Section]:
    """Per section (params, metric points, summary, tags, artifacts, images, tables, models, status):
    how many items were logged, how many were found equal, which are missing or different.

    Backend conventions that are not losses are allowed for: MLflow keeps params as text and skips NaN
    summary values (an undefined ROC-AUC); W&B drops empty config sections and NaN summary values.
    """
    mlflow = backend == "mlflow"
    nan = lambda k, v: isinstance(v, float) and math.isnan(v)  # noqa: E731
    empty = lambda k, v: isinstance(v, dict) and not v  # noqa: E731
    sections = {
        "params": _compare_map(sent.params, stored.params, as_text=mlflow,
                               skip=(lambda k, v: False) if mlflow else empty),
        "summary": _compare_map(sent.summary, stored.summary, skip=nan),
        "tags": _compare_map(sent.tags, stored.tags),
        "artifacts": _compare_set(sent.artifacts, stored.artifacts),
        "images": _compare_set(sent.images, stored.images),
        # each backend names its model its own way (an MLflow logged model, a W&B model artifact): count them
        "models": Section(logged=len(sent.models), found=min(len(sent.models), len(stored.models)),
                          missing=sent.models[len(stored.models):]),
    }
    points = Section()
    stored_points = {k: dict(v) for k, v in stored.metrics.items()}
    for key, series in sent.metrics.items():
        for step, value in series:
            points.logged += 1
            have = stored_points.get(key, {})
            if step not in have:
                points.missing.append(f"{key}@{step}")
            elif not _same(float(value), have[step], as_text=False):
                points.mismatched.append(f"{key}@{step}: sent {value!r}, stored {have[step]!r}")
            else:
                points.found += 1
    sections["metric_points"] = points
    tables = Section()
    for name, rows in sent.tables.items():
        tables.logged += 1
        if name not in stored.tables:
            tables.missing.append(name)
        elif stored.tables[name] != rows:
            tables.mismatched.append(f"{name}: sent {rows} rows, stored {stored.tables[name]}")
        else:
            tables.found += 1
    sections["tables"] = tables
    status = Section(logged=1)
    if stored.status == sent.status:
        status.found = 1
    else:
        status.mismatched.append(f"status: sent {sent.status}, stored {stored.status}")
    sections["status"] = status
    return sections


def total_lost(sections: Mapping[str, Section]) -> int:
    return sum(s.lost for s in sections.values())
