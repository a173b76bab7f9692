"""Capabilities, observed: every cell of the matrix comes from a run of this compare or from a check
made here, with the evidence (a run id, a folder, a number, an error message), never from prose alone.

A cell is ``yes``, ``no``, ``not measurable offline`` (needs the W&B server or network) or ``failed``
(the check itself broke; its error is the evidence).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cxrtrack.tracking.readback import RunRecord

YES, NO, OFFLINE, FAILED = "yes", "no", "not measurable offline", "failed"


def cell(status: str, evidence: str, path: str | None = None) -> dict[str, Any]:
    return {"status": status, "evidence": evidence, **({"path": path} if path else {})}


def _guard(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a broken check is reported, not fatal
        return cell(FAILED, f"{type(exc).__name__}: {str(exc)[:300]}")


def _wandb_cli() -> str:
    path = Path(sys.executable).with_name("wandb")
    return str(path) if path.exists() else "wandb"


def _quiet_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    return env


def observe(stored: dict[str, RunRecord], latency: dict[str, Any], server_uri: str | None, work: Path,
            group: str | None, screenshot: Path | None, screenshot_url: str | None = None) -> list[dict[str, Any]]:
    """``stored``: backend -> a run of this compare read back from its store."""
    found = {backend: stored.get(backend) for backend in ("mlflow", "wandb")}
    # the checks read m and w only when their run was read back: row() reports a missing one before any check runs
    m, w = cast(RunRecord, found["mlflow"]), cast(RunRecord, found["wandb"])
    rows = []

    def row(name: str, mlflow_check, wandb_check, mlflow_needs_run=True, wandb_needs_run=True) -> None:
        def run(check, needs, record):
            if needs and record is None:
                return cell(FAILED, "no run of this tracker was read back in this compare")
            return _guard(check)

        rows.append({"capability": name, "mlflow": run(mlflow_check, mlflow_needs_run, found["mlflow"]),
                     "wandb": run(wandb_check, wandb_needs_run, found["wandb"])})

    row("System metrics recorded",
        lambda: cell(YES if m.system_metrics else NO, f"{len(m.system_metrics)} system metrics in MLflow run "
                     f"{m.extra['run_id']}: {', '.join(m.system_metrics[:3])}"),
        lambda: cell(YES if w.system_metrics else NO, f"{len(w.system_metrics)} stats keys in "
                     f"{w.extra['run_dir']}: {', '.join(w.system_metrics[:3])}", w.extra["run_dir"]))
    row("Images",
        lambda: cell(YES if m.images else NO, f"{len(m.images)} PNG artifacts: {', '.join(m.images[:3])}"),
        lambda: cell(YES if w.images else NO, f"{len(w.images)} logged images: {', '.join(w.images[:3])}"))
    row("Tables",
        lambda: cell(YES if m.tables else NO,
                     "; ".join(f"{k}: {v} rows (mlflow.log_table)" for k, v in m.tables.items()) or "no table"),
        lambda: cell(YES if w.tables else NO, "; ".join(f"{k}: {v} rows (wandb.Table)" for k, v in w.tables.items())
                     or "no table"))
    row("Model registry / versioned model",
        lambda: cell(YES if m.models else NO, f"logged model(s) {m.models}; registered versions "
                     f"{m.extra.get('registered_versions') or 'none (registration is off for this config)'}"),
        lambda: cell(YES if w.models else NO, f"model artifact(s) with aliases {w.extra.get('model_aliases')}; "
                     f"linking to the W&B Registry needs the server ({OFFLINE})"))
    row("Dataset lineage",
        lambda: cell(YES if m.extra.get("dataset_inputs") else NO,
                     f"run inputs: {m.extra.get('dataset_inputs') or 'none logged by this project'}"),
        lambda: _wandb_lineage(w))
    row("Offline run that syncs later", lambda: _mlflow_without_store(work), lambda: _wandb_offline_sync(w),
        mlflow_needs_run=False)
    row("Local UI", lambda: _mlflow_ui(server_uri, screenshot, screenshot_url), lambda: _wandb_ui(work), False, False)
    row("Parent / child runs, groups", lambda: _mlflow_parent_child(m, group), lambda: _wandb_group(w, group))
    row("Hyperparameter sweeps", _mlflow_sweeps, lambda: _wandb_sweep(work), False, False)
    row("Read-back API (used for the fidelity check)",
        lambda: cell(YES, f"MlflowClient read {sum(len(v) for v in m.metrics.values())} metric points, "
                     f"{len(m.params)} params, {len(m.artifacts) + len(m.images)} artifacts"),
        lambda: cell(YES, f"offline: `wandb leet inspect --json` read {sum(len(v) for v in w.metrics.values())} "
                     f"metric points, {len(w.params)} config values; online `wandb.Api()` is {OFFLINE}"))
    row("Asynchronous logging", lambda: _async(latency, "mlflow-sqlite", "mlflow-sqlite-async"),
        lambda: _async(latency, "wandb-offline", None), False, False)
    return rows


def _wandb_offline_sync(w: RunRecord) -> dict[str, Any]:
    run_dir = Path(w.extra["run_dir"])
    proc = subprocess.run([_wandb_cli(), "sync", str(run_dir)], capture_output=True, text=True, timeout=120,
                          cwd=run_dir.parent, env=_quiet_env(), stdin=subprocess.DEVNULL)
    said = " ".join((proc.stdout + proc.stderr).split())[-200:]
    return cell(YES, f"the run was written offline to {run_dir.name}; uploading it (`wandb sync`) is {OFFLINE}: "
                     f"here it answered: {said}", str(run_dir))


def _mlflow_without_store(work: Path) -> dict[str, Any]:
    """MLflow has no offline mode: a run needs its store at start. Checked against a closed port."""
    code = ("import mlflow; mlflow.set_tracking_uri('http://127.0.0.1:9');\n"
            "try:\n mlflow.start_run(); print('started')\n"
            "except Exception as e: print(type(e).__name__, str(e).splitlines()[0][:160])")
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=work, env=env)
    said = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])[:220]
    status = NO if not said.startswith("started") else YES
    return cell(status, "no offline mode or sync command in MLflow: start_run against an unreachable server "
                        f"-> {said}. A local SQLite store is the offline option (runs stay in that file)")


def _mlflow_ui(server_uri: str | None, screenshot: Path | None, page: str | None = None) -> dict[str, Any]:
    if not server_uri:
        return cell(FAILED, "no mlflow server was started in this compare")
    with urllib.request.urlopen(server_uri + "/", timeout=10) as response:
        body = response.read()
        kind = response.headers.get("Content-Type", "")
    evidence = f"`mlflow server` on {server_uri} answered / with HTTP {response.status} ({kind}, {len(body)} bytes)"
    if screenshot and screenshot.exists():
        shown = f"a measured run's page ({page})" if page else "the UI"
        return cell(YES, evidence + f"; {shown} rendered in headless Chromium: {screenshot.name}", str(screenshot))
    return cell(YES, evidence)


def _wandb_ui(work: Path) -> dict[str, Any]:
    # cwd: the wandb CLI writes wandb/debug-cli.*.log into its working directory
    proc = subprocess.run([_wandb_cli(), "leet", "--help"], capture_output=True, text=True, timeout=60,
                          env=_quiet_env(), stdin=subprocess.DEVNULL, cwd=work)
    docker = shutil.which("docker")
    server = "no Docker engine here" if not docker else (
        "Docker client only" if subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode
        else "Docker runs")
    status = YES if proc.returncode == 0 else NO
    return cell(status, f"terminal UI: `wandb leet` (exit {proc.returncode}); a local web UI needs W&B Server, a "
                        f"Docker image ({server}); the web app is {OFFLINE}")


def _mlflow_parent_child(m: RunRecord, group: str | None) -> dict[str, Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=m.extra.get("tracking_uri"))
    parent = client.create_run(m.extra["experiment_id"], run_name="capability-parent")
    child = client.create_run(m.extra["experiment_id"], run_name="capability-child",
                              tags={"mlflow.parentRunId": parent.info.run_id})
    client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    found = client.search_runs([m.extra["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    grouped = f"; the measured run carries tag group={m.tags.get('group') or '(none)'}" if group else ""
    return cell(YES if [r.info.run_id for r in found] == [child.info.run_id] else NO,
                f"child {child.info.run_id[:8]} found under parent {parent.info.run_id[:8]} by search_runs "
                f"(nested runs){grouped}")


def _wandb_group(w: RunRecord, group: str | None) -> dict[str, Any]:
    got = w.extra.get("group")
    if group:
        status = YES if got == group else NO
        return cell(status, f"no parent runs; runs are grouped instead: the measured run's group read back is "
                            f"{got!r} (set {group!r}), job_type {w.extra.get('job_type')!r}")
    return cell(YES if got else NO, f"no parent runs; group read back: {got!r}")


def _mlflow_sweeps() -> dict[str, Any]:
    import importlib.util

    has_tuning = importlib.util.find_spec("cxrtrack.tuning") is not None
    engine = importlib.util.find_spec("optuna") is not None
    evidence = "MLflow has no search engine (no sweep/tune API in the mlflow package); "
    if has_tuning and engine:
        return cell(YES, evidence
                    + "this project drives it with Optuna: `make mlflow-tune` (parent run + nested trials)")
    return cell(NO, evidence + "an external engine (Optuna, Ray Tune) is needed")


def _wandb_sweep(work: Path) -> dict[str, Any]:
    code = ("import wandb\ntry:\n wandb.sweep({'method': 'random', 'parameters': {'lr': {'values': [1, 2]}}}, "
            "project='capability-check'); print('created')\nexcept Exception as e: print(type(e).__name__, e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=work,
                          env={**_quiet_env(), "NETRC": os.environ.get("NETRC", "")}, stdin=subprocess.DEVNULL)
    said = (proc.stdout.strip() or proc.stderr.strip()[-200:])[:220]
    if said.startswith("created"):
        return cell(YES, "wandb.sweep created a sweep on the W&B server")
    return cell(OFFLINE, f"W&B sweeps run on the W&B server: wandb.sweep here -> {said}")


def _async(latency: dict[str, Any], sync_key: str, async_key: str | None) -> dict[str, Any]:
    ops = lambda key: latency.get(key, {}).get("ops", {})  # noqa: E731
    if async_key:
        a, s = ops(async_key).get("log_metrics"), ops(sync_key).get("log_metrics")
        if not a or not s:
            return cell(FAILED, "latency of MLflow's synchronous/asynchronous logging was not measured")
        return cell(YES, f"opt-in (synchronous=False / MLFLOW_ENABLE_ASYNC_LOGGING): log_metrics median "
                         f"{a['raw']['median_s'] * 1e3:.1f} ms vs {s['raw']['median_s'] * 1e3:.1f} ms synchronous")
    s = ops(sync_key).get("log_metrics")
    if not s:
        return cell(FAILED, "latency of W&B logging was not measured")
    return cell(YES, "always: run.log hands the row to W&B's service process "
                     f"(median {s['raw']['median_s'] * 1e3:.2f} ms)")


def _wandb_lineage(w) -> dict[str, Any]:
    if "use_artifact" in w.extra.get("record_types", []):
        return cell(YES, "a used dataset artifact in the run")
    logged = w.extra.get("dataset_artifacts") or []
    if logged:  # offline, W&B refuses use_artifact ("Cannot use artifact when in offline mode")
        return cell(YES, f"dataset artifact(s) {logged} (a reference to the folder, no copy) logged by the run; "
                         f"recording it as the run's input (use_artifact) needs the server ({OFFLINE})")
    return cell(NO, "no dataset artifact in the run")
