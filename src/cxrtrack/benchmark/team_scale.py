"""The team-scale tier of ``make compare SCALE=1``: N trainings writing to one store at the same time.

Stores: ``mlflow-server-postgres`` (a real ``mlflow server`` with proxied artifacts, ``--artifacts-destination``, on
a throwaway PostgreSQL cluster, both on 127.0.0.1), ``mlflow-sqlite`` (N processes writing one ``sqlite:///`` file)
and ``wandb-offline`` (each process its own offline run and its own W&B service). Levels: 1, 4, 16 and 64 writers.

Each writer is a fresh process (``python -m cxrtrack.benchmark.team_scale --writer ...``) doing what a training run
does through the client: start a run, log its params, log 10 metrics per epoch for 50 epochs (one call per epoch, as
the trainer's callback does), log three small files and the model (a small torch ``state_dict`` file, made once by
the orchestrator). Every writer imports its client, then waits for one "go" file so that the N runs really log at
once. It journals every call (what it sent, how long the call took, the error, the HTTP retries urllib3 made) to a
JSON-lines file, flushed per line, so a writer that is killed leaves the record of what it sent.

Afterwards every run is read back from its store and compared with its writer's journal: params, every metric
point, artifacts (path and size). A writer that died is reported with its exit (the signal), the epochs it logged
and the points it never sent. Levels stop at a time budget per store (and before a level that would not fit in the
memory left): the report says which levels ran and why the others did not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from cxrtrack.benchmark.runs import TreeSampler
from cxrtrack.benchmark.server import MLflowServer, PostgreSQL

log = logging.getLogger(__name__)

STORES = ("mlflow-server-postgres", "mlflow-sqlite", "wandb-offline")
KEYS = [f"train/m{i}" for i in range(10)]
FILES = {"config.yaml": 600, "history.csv": 4_000, "report.json": 1_500}  # the small files, bytes each
OPS = ("start", "params", "log", "artifact", "model", "finish")


@dataclass
class ScalePlan:
    levels: tuple[int, ...] = (1, 4, 16, 64)
    stores: tuple[str, ...] = STORES
    epochs: int = 50
    params: int = 30
    epoch_s: float = 0.0  # pause between epochs (0: every writer logs back to back, the worst case)
    budget_s: float = 900.0  # per store: a level is not started when its projected time exceeds what is left
    server_workers: int = 2
    kill_writer_at_epoch: int | None = None  # tests: SIGKILL writer 0 once it has logged this many epochs
    kill_group: bool = False  # ... with its W&B service (a container or Slurm job killed), not the writer alone
    ready_timeout_s: float = 600.0


# -- the writer ---------------------------------------------------------------------------------------------------


class RetryCounter(logging.Handler):
    """Counts urllib3's retries (its ``Incremented Retry`` debug record): every HTTP retry an MLflow client makes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Incremented Retry"):
            self.count += 1

    def install(self) -> RetryCounter:
        logger = logging.getLogger("urllib3.util.retry")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        logger.propagate = False
        return self


class Journal:
    """One JSON line per call, flushed at once: what a killed writer sent is on disk."""

    def __init__(self, path: Path, retries: RetryCounter):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the writer's life
        self.retries = retries

    def write(self, **entry: Any) -> None:
        self.file.write(json.dumps(entry) + "\n")

    def call(self, op: str, fn, **sent: Any) -> Any:
        """Time ``fn()``; journal the op, what it sent, its duration, its error, its retries. Returns its result or
        None after an error."""
        before, t0, start = self.retries.count, time.time(), time.perf_counter()
        try:
            result, error = fn(), None
        except Exception as exc:  # noqa: BLE001 - a failed call is a measurement
            result, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
        self.write(op=op, t=t0, s=time.perf_counter() - start, ok=error is None, error=error,
                   retries=self.retries.count - before, **sent)
        return result


def metric_row(index: int, epoch: int) -> dict[str, float]:
    return {key: round(1.0 / (epoch + 1) + k + index / 1000, 6) for k, key in enumerate(KEYS)}


def write_files(folder: Path, index: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size in FILES.items():
        path = folder / name
        path.write_bytes((f"writer {index} {name}\n".encode() * size)[:size])
        paths.append(path)
    return paths


def wait_for_go(go: Path, ready: Path, timeout: float) -> None:
    ready.touch()
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.02)


def mlflow_writer(args: argparse.Namespace, journal: Journal) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=args.uri)
    params = {f"p{i:02d}": f"{args.index}-{i}" for i in range(args.params)}
    files = write_files(args.work / "files", args.index)
    wait_for_go(args.go, args.ready, args.ready_timeout)
    run = journal.call("start", lambda: client.create_run(args.experiment_id, run_name=f"writer-{args.index}"))
    if run is None:
        return
    run_id = run.info.run_id
    journal.write(op="run", run=run_id)
    journal.call("params", lambda: client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()]),
                 params=params)
    for epoch in range(args.epochs):
        row, now = metric_row(args.index, epoch), int(time.time() * 1000)
        points = [Metric(k, v, now, epoch) for k, v in row.items()]
        journal.call("log", partial(client.log_batch, run_id, metrics=points), epoch=epoch, metrics=row)
        time.sleep(args.epoch_s)
    for path in files:
        journal.call("artifact", partial(client.log_artifact, run_id, str(path)), path=path.name,
                     bytes=path.stat().st_size)
    journal.call("model", lambda: client.log_artifact(run_id, str(args.model), "model"),
                 path=f"model/{args.model.name}", bytes=args.model.stat().st_size)
    journal.call("finish", lambda: client.set_terminated(run_id))


def wandb_writer(args: argparse.Namespace, journal: Journal) -> None:
    import wandb

    params = {f"p{i:02d}": f"{args.index}-{i}" for i in range(args.params)}
    files = write_files(args.work / "files", args.index)
    wait_for_go(args.go, args.ready, args.ready_timeout)
    run = journal.call("start", lambda: wandb.init(mode="offline", project="team-scale", name=f"writer-{args.index}",
                                                    dir=str(args.store), config=params,
                                                    settings=wandb.Settings(silent=True)), params=params)
    if run is None:
        return
    journal.write(op="run", run=str(run.settings.sync_dir))
    run.define_metric("epoch", hidden=True)
    run.define_metric("train/*", step_metric="epoch")
    for epoch in range(args.epochs):
        row = metric_row(args.index, epoch)
        journal.call("log", partial(run.log, {**row, "epoch": epoch}), epoch=epoch, metrics=row)
        time.sleep(args.epoch_s)
    journal.call("artifact", lambda: _wandb_files(wandb, run, files), paths=[p.name for p in files],
                 bytes=[p.stat().st_size for p in files])
    journal.call("model", lambda: _wandb_model(wandb, run, args.model), path=args.model.name)
    journal.call("finish", run.finish)


def _wandb_files(wandb, run, files: list[Path]) -> None:
    """As the project's W&B backend does: the run's files as one ``run-files`` artifact."""
    artifact = wandb.Artifact(f"run-files-{run.id}", type="run-files")
    for path in files:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)


def _wandb_model(wandb, run, model: Path) -> None:
    artifact = wandb.Artifact(f"model-{run.id}", type="model")
    artifact.add_file(str(model), name=model.name)
    run.log_artifact(artifact)


def writer_main(args: argparse.Namespace) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    journal = Journal(args.out, RetryCounter().install())
    journal.write(op="begin", t=time.time(), pid=os.getpid(), index=args.index, epochs=args.epochs)
    (mlflow_writer if args.backend.startswith("mlflow") else wandb_writer)(args, journal)
    journal.write(op="end", t=time.time(), retries=journal.retries.count)


# -- the orchestrator: one level ----------------------------------------------------------------------------------


@dataclass
class Level:
    """One level's writers: their processes, journals and the orchestrator's view of them."""

    store: str
    n: int
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    launched: float = 0.0
    go_t: float | None = None
    stopped_by_budget: list[int] = field(default_factory=list)
    killed_by_test: list[int] = field(default_factory=list)

    def journal(self, i: int) -> Path:
        return self.folder / f"writer-{i}.jsonl"


def writer_command(level: Level, i: int, uri: str | None, experiment_id: str | None, plan: ScalePlan,
                   model: Path, store_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "cxrtrack.benchmark.team_scale", "--writer", "--backend", level.store,
               "--index", str(i), "--epochs", str(plan.epochs), "--params", str(plan.params),
               "--epoch-s", str(plan.epoch_s), "--model", str(model), "--store", str(store_dir),
               "--work", str(level.folder / f"work-{i}"), "--out", str(level.journal(i)),
               "--go", str(level.folder / "go"), "--ready", str(level.folder / f"ready-{i}"),
               "--ready-timeout", str(plan.ready_timeout_s)]
    if uri:
        command += ["--uri", uri, "--experiment-id", str(experiment_id)]
    return command


def launch(level: Level, commands: list[list[str]], env: dict[str, str]) -> None:
    level.folder.mkdir(parents=True, exist_ok=True)
    level.launched = time.time()
    for i, command in enumerate(commands):
        with open(level.folder / f"writer-{i}.log", "wb") as out:
            level.procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                stdin=subprocess.DEVNULL, start_new_session=True))


def epochs_logged(journal: Path) -> int:
    if not journal.exists():
        return 0
    return sum(1 for line in journal.read_text().splitlines() if '"op": "log"' in line)


def release_when_ready(level: Level, deadline: float) -> None:
    """The go file, once every live writer has imported its client (or at the deadline)."""
    while time.time() < deadline:
        ready = sum((level.folder / f"ready-{i}").exists() or p.poll() is not None for i, p in enumerate(level.procs))
        if ready == level.n:
            break
        time.sleep(0.1)
    (level.folder / "go").touch()
    level.go_t = time.time()


def wait_level(level: Level, deadline: float, plan: ScalePlan) -> None:
    """Wait for every writer; SIGKILL writer 0 once it logged ``kill_writer_at_epoch`` epochs (tests: the writer alone,
    as the OOM killer does, or with ``kill_group`` its process group, W&B's service included); at the deadline SIGKILL
    the writers still running (the budget). Then what a writer left running (a W&B service finishing its file) gets
    15 s to end before its process group is killed."""
    kill_at = plan.kill_writer_at_epoch
    while any(p.poll() is None for p in level.procs):
        if kill_at is not None and not level.killed_by_test and level.procs[0].poll() is None \
                and epochs_logged(level.journal(0)) >= kill_at:
            (os.killpg if plan.kill_group else os.kill)(level.procs[0].pid, signal.SIGKILL)
            level.killed_by_test.append(0)
        if time.time() > deadline:
            for i, p in enumerate(level.procs):
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    level.stopped_by_budget.append(i)
            break
        time.sleep(0.1)
    for p in level.procs:
        p.wait()
    end = time.time() + 15
    while time.time() < end and any(group_alive(p.pid) for p in level.procs):
        time.sleep(0.2)
    for p in level.procs:  # a killed writer's W&B service is in its process group: nothing may outlive the level
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# -- the orchestrator: reading back -------------------------------------------------------------------------------


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the last line of a killed writer may be cut
            out.append(json.loads(line))
    return out


@dataclass
class Sent:
    """What one writer's journal says reached its store (calls that returned without an error)."""

    run: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    points: dict[tuple[str, int], float] = field(default_factory=dict)
    artifacts: dict[str, int] = field(default_factory=dict)  # path in the run -> bytes
    epochs: int = 0
    finished: bool = False


def sent_by(entries: list[dict[str, Any]]) -> Sent:
    sent = Sent()
    for e in entries:
        if e["op"] == "run":
            sent.run = e["run"]
        if not e.get("ok"):
            continue
        if e["op"] in ("params", "start") and e.get("params"):
            sent.params.update(e["params"])
        elif e["op"] == "log":
            sent.epochs += 1
            sent.points.update({(k, e["epoch"]): v for k, v in e["metrics"].items()})
        elif e["op"] in ("artifact", "model"):
            sent.artifacts.update(_files_of(e))
        elif e["op"] == "finish":
            sent.finished = True
    return sent


def _files_of(entry: dict[str, Any]) -> dict[str, int]:
    """path -> bytes of an artifact call (W&B's run-files call sends several files at once)."""
    if "paths" in entry:
        return dict(zip(entry["paths"], entry["bytes"], strict=True))
    return {entry["path"]: entry.get("bytes", 0)}


def read_mlflow_run(uri: str, run_id: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    points = {(m.key, m.step): m.value for key in KEYS for m in client.get_metric_history(run_id, key)}

    def files(path: str | None = None) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for info in client.list_artifacts(run_id, path):
            out.update(files(info.path) if info.is_dir else {info.path: info.file_size})
        return out

    return {"params": dict(run.data.params), "points": points, "artifacts": files(), "status": run.info.status}


def read_wandb_run(run_dir: str) -> dict[str, Any]:
    from cxrtrack.tracking.readback import read_wandb

    record = read_wandb(run_dir)
    points = {(k, step): v for k in KEYS for step, v in record.metrics.get(k, [])}
    artifacts: dict[str, int | None] = {p: None for p in record.artifacts}
    artifacts.update({f"model/{m}": None for m in record.models})
    return {"params": {k: str(v) for k, v in record.params.items()}, "points": points, "artifacts": artifacts,
            "status": record.status}


def compare_run(sent: Sent, stored: dict[str, Any], store: str) -> dict[str, int]:
    params = sum(stored["params"].get(k) == v for k, v in sent.params.items())
    points = sum(abs(stored["points"].get(kv, float("nan")) - v) < 1e-6 for kv, v in sent.points.items())
    if store == "wandb-offline":  # W&B names the model by its artifact, not by its file: compare by presence
        found_art = sum(1 for p in sent.artifacts if p in stored["artifacts"] or
                        (p.endswith(".pt") and any(a.startswith("model/") for a in stored["artifacts"])))
    else:
        found_art = sum(stored["artifacts"].get(p) == size for p, size in sent.artifacts.items())
    return {"params": params, "points": points, "artifacts": found_art}


def readback(store: str, uri: str | None, sents: list[Sent]) -> dict[str, Any]:
    """Every writer's run read back and compared with its journal; totals, and per writer (``by_writer``)."""
    failed: list[str] = []
    statuses: Counter[str] = Counter()
    by_writer: list[dict[str, Any]] = []
    for sent in sents:
        logged = {"params": len(sent.params), "points": len(sent.points), "artifacts": len(sent.artifacts)}
        entry: dict[str, Any] = {"logged": logged, "found": dict.fromkeys(logged, 0), "status": None}
        by_writer.append(entry)
        if sent.run is None:
            continue
        try:
            stored = read_wandb_run(sent.run) if store == "wandb-offline" else read_mlflow_run(str(uri), sent.run)
        except Exception as exc:  # noqa: BLE001 - a run that cannot be read back is itself a finding
            failed.append(f"{sent.run}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        entry.update(status=str(stored["status"]), found=compare_run(sent, stored, store))
        statuses[entry["status"]] += 1
    logged = {k: sum(w["logged"][k] for w in by_writer) for k in ("params", "points", "artifacts")}
    found = {k: sum(w["found"][k] for w in by_writer) for k in logged}
    return {"runs_sent": sum(s.run is not None for s in sents), "runs_read": sum(statuses.values()),
            "statuses": dict(statuses), "logged": logged, "found": found,
            "lost": sum(logged[k] - found[k] for k in logged), "read_failed": failed[:10], "by_writer": by_writer}


# -- the orchestrator: summing up ---------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms, computed as the latency phase does (numpy's linear interpolation, ``latency.summarise``),
    so the two sections of the report mean the same thing by "p95"."""
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "n": 0}
    import numpy as np  # here, not at the top: the writer processes import this module and never need it

    p50, p95, p99 = (float(x) * 1000 for x in np.percentile(np.asarray(values, dtype=float), [50, 95, 99]))
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "n": len(values)}


def writer_fates(level: Level, journals: list[list[dict[str, Any]]], plan: ScalePlan) -> list[dict[str, Any]]:
    """Every writer that did not end cleanly: its exit, how it ended, the epochs it logged."""
    out = []
    for i, (proc, entries) in enumerate(zip(level.procs, journals, strict=True)):
        code = proc.returncode
        ended = any(e["op"] == "end" for e in entries)
        if code == 0 and ended:
            continue
        how = (f"killed by the test (SIGKILL{' to its process group' if plan.kill_group else ''})"
               if i in level.killed_by_test else
               "stopped at the time budget (SIGKILL)" if i in level.stopped_by_budget else
               f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}")
        epochs = sum(1 for e in entries if e["op"] == "log" and e.get("ok"))
        out.append({"writer": i, "exit_code": code, "how": how, "epochs_logged": epochs,
                    "points_never_sent": (plan.epochs - epochs) * len(KEYS)})
    return out


def error_kind(error: str) -> str:
    """An error's class and its telling part: the database driver's own error when the client wrapped one (an
    MLflowException around ``(sqlite3.OperationalError) database is locked``), else its first 80 characters."""
    cls, _, text = error.partition(": ")
    inner = re.search(r"\((\w+(?:\.\w+)*(?:Error|Exception))\) ([^\n\[]+)", text)
    return f"{cls}: {inner.group(1)} {inner.group(2).strip()[:80]}" if inner else f"{cls}: {text[:80]}"


def summarize(level: Level, plan: ScalePlan, writers: TreeSampler, store: TreeSampler, uri: str | None,
              end_t: float) -> dict[str, Any]:
    journals = [read_journal(level.journal(i)) for i in range(level.n)]
    calls = [e for entries in journals for e in entries if e["op"] in OPS]
    errors = [e for e in calls if not e["ok"]]
    logs_ok = [e for e in calls if e["op"] == "log" and e["ok"]]
    window = (max(e["t"] + e["s"] for e in logs_ok) - min(e["t"] for e in logs_ok)) if logs_ok else None
    finishes = [e["t"] + e["s"] - (level.go_t or level.launched) for e in calls if e["op"] == "finish" and e["ok"]]
    sents = [sent_by(entries) for entries in journals]
    return {
        "writers": level.n, "ran": True,
        "wall_s": end_t - level.launched, "import_s": (level.go_t or end_t) - level.launched,
        "all_finished_s": end_t - (level.go_t or level.launched),
        "run_finish_s": {"median": statistics.median(finishes) if finishes else None,
                         "max": max(finishes) if finishes else None, "runs": len(finishes)},
        "latency": {op: percentiles([e["s"] for e in calls if e["op"] == op and e["ok"]]) for op in OPS},
        "all_calls": percentiles([e["s"] for e in calls if e["ok"]]),
        "calls": len(calls), "errors": len(errors),
        "error_kinds": dict(Counter(error_kind(str(e["error"])) for e in errors).most_common(5)),
        "retries": sum(e.get("retries", 0) for e in calls),
        "points_ok": len(logs_ok) * len(KEYS), "points_per_s": len(logs_ok) * len(KEYS) / window if window else None,
        "writers_died": writer_fates(level, journals, plan),
        "readback": readback(level.store, uri, sents),
        # sampled every 0.5 s (sums at one moment); per_writer_peak_own_mb adds each process's own peak (VmHWM): it
        # includes spikes between samples, but is an upper bound (the peaks need not have been at the same time)
        "memory": {"peak_total_rss_mb": writers.peak_total / 2**20, "peak_processes": writers.peak_processes,
                   "per_writer_peak_mb": statistics.median(writers.peak_tree) / 2**20 if level.n else None,
                   "per_writer_peak_own_mb": statistics.median(writers.peak_tree_own(i, min_samples=1)
                                                               for i in range(level.n)) / 2**20 if level.n else None,
                   "store_peak_rss_mb": store.peak_total / 2**20 or None},
    }


# -- the orchestrator: a store and its levels ---------------------------------------------------------------------


def make_model(path: Path) -> Path:
    """A small torch model's ``state_dict`` (a 64-32-3 MLP: 2,179 parameters, ~10 KB), the run's model file."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def writer_env(store_dir: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(store_dir / "wandb-data"), "WANDB_CACHE_DIR": str(store_dir / "wandb-cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def skip_reason(n: int, done: list[dict[str, Any]], left_s: float) -> str | None:
    """Why level ``n`` is not started: the time it would take, projected linearly from the last level that ran,
    exceeds what is left of the budget, or its memory would not fit in what is available."""
    ran = [d for d in done if d.get("ran")]
    if not ran:
        return None if left_s > 0 else "no time left in the budget"
    last = ran[-1]
    projected = last["wall_s"] * n / last["writers"]
    if projected > left_s:
        return (f"projected {projected:.0f} s ({last['wall_s']:.0f} s for {last['writers']} writers x "
                f"{n / last['writers']:.0f}) > {max(left_s, 0):.0f} s left of the budget")
    need_mb = last["memory"]["peak_total_rss_mb"] * n / last["writers"]
    available = psutil.virtual_memory().available / 2**20
    if need_mb > 0.8 * available:
        return f"projected {need_mb / 1024:.1f} GiB of writer memory > 80 % of the {available / 1024:.1f} GiB available"
    return None


def run_level(store: str, n: int, plan: ScalePlan, folder: Path, uri: str | None, model: Path,
              deadline: float, store_pids: list[int]) -> dict[str, Any]:
    level = Level(store, n, folder / f"{n}-writers")
    experiment_id = new_experiment(uri, f"team-scale-{n}", folder) if uri else None
    store_dir = folder / "store"
    commands = [writer_command(level, i, uri, experiment_id, plan, model, store_dir) for i in range(n)]
    launch(level, commands, writer_env(store_dir))
    writer_memory, store_memory = TreeSampler([p.pid for p in level.procs], 0.5), TreeSampler(store_pids, 0.5)
    for sampler in (writer_memory, store_memory):
        sampler.start()
    try:
        release_when_ready(level, min(deadline, time.time() + plan.ready_timeout_s))
        wait_level(level, deadline, plan)
    finally:
        end_t = time.time()
        for sampler in (writer_memory, store_memory):
            sampler.stop_event.set()
            sampler.join()
        for p in level.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return summarize(level, plan, writer_memory, store_memory, uri, end_t)


def new_experiment(uri: str, name: str, folder: Path) -> str:
    """Created before the writers start (N processes creating one experiment would race on its name)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    location = (folder / "store" / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def run_store(store: str, plan: ScalePlan, folder: Path, model: Path) -> dict[str, Any]:
    """Every level of one store, within the store's budget."""
    deadline = time.time() + plan.budget_s
    with store_context(store, plan, folder) as (uri, pids, about):
        levels: list[dict[str, Any]] = []
        for n in plan.levels:
            reason = skip_reason(n, levels, deadline - time.time())
            if reason:
                levels.append({"writers": n, "ran": False, "reason": reason})
                log.info("team scale: %s, %d writers not run: %s", store, n, reason)
                continue
            log.info("team scale: %s, %d writers ...", store, n)
            levels.append(run_level(store, n, plan, folder, uri, model, deadline, pids))
            log.info("team scale: %s, %d writers: %.0f s, %d errors, %d lost", store, n, levels[-1]["wall_s"],
                     levels[-1]["errors"], levels[-1]["readback"]["lost"])
    return {**about, "levels": levels}


@contextlib.contextmanager
def store_context(store: str, plan: ScalePlan, folder: Path):
    """(tracking URI or None, the store's own process ids for its memory, what the store is)."""
    folder.mkdir(parents=True, exist_ok=True)
    if store == "mlflow-server-postgres":
        with PostgreSQL() as pg, MLflowServer(folder / "server", backend_store_uri=pg.uri,
                                              workers=plan.server_workers) as server:
            assert pg.process is not None and server.process is not None
            yield server.uri, [pg.process.pid, server.process.pid], {
                "store": f"mlflow server ({plan.server_workers} workers, --artifacts-destination: proxied artifacts, "
                         f"{pool_setting()}) on PostgreSQL {pg_version()}, both on 127.0.0.1",
                "server_start_s": server.start_s}
    elif store == "mlflow-sqlite":
        uri = f"sqlite:///{(folder / 'store' / 'mlflow.db').resolve()}"
        (folder / "store").mkdir(parents=True, exist_ok=True)
        yield uri, [], {"store": "one sqlite:/// file, written by every process"}
    else:
        yield None, [], {"store": "W&B offline: each process its own run folder and its own W&B service"}


def pool_setting() -> str:
    """The server's database connection pool per worker (MLflow's environment variables, which it inherits)."""
    size = os.environ.get("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE") or "5 (SQLAlchemy's default)"
    overflow = os.environ.get("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW") or "10 (default)"
    return f"database pool {size} + overflow {overflow} per worker"


def pg_version() -> str:
    bindir = PostgreSQL.bindir()
    return bindir.parent.name if bindir else "?"


def measure(plan: ScalePlan, folder: Path) -> dict[str, Any]:
    """The scale tier: each store in turn, levels ascending. A store that cannot be set up is reported, not raised."""
    model = make_model(folder / "model" / "state_dict.pt")
    out: dict[str, Any] = {"plan": {"levels": list(plan.levels), "epochs": plan.epochs, "params": plan.params,
                                    "metrics_per_epoch": len(KEYS), "files": FILES, "model_bytes": model.stat().st_size,
                                    "epoch_s": plan.epoch_s, "budget_s_per_store": plan.budget_s,
                                    "cores": os.cpu_count()},
                           "stores": {}}
    for store in plan.stores:
        if store == "mlflow-server-postgres" and PostgreSQL.unavailable():
            out["stores"][store] = {"skipped": PostgreSQL.unavailable()}
            continue
        start = time.perf_counter()
        try:
            out["stores"][store] = run_store(store, plan, folder / store, model)
        except Exception as exc:  # noqa: BLE001 - one store's failure must not lose the others
            log.warning("team scale: %s failed: %s", store, exc)
            out["stores"][store] = {"failed": f"{type(exc).__name__}: {exc}"}
        out["stores"][store]["seconds"] = time.perf_counter() - start
    return out


# -- the report section -------------------------------------------------------------------------------------------


def _ms(p: dict[str, Any]) -> str:
    if not p or p.get("p50_ms") is None:
        return "n/a"
    return f"{p['p50_ms']:.0f} / {p['p95_ms']:.0f} / {p['p99_ms']:.0f}"


def _died(d: dict[str, Any]) -> str:
    """The writers that did not end cleanly, grouped by how they ended: which, epochs logged, points never sent, and
    what their runs hold of what they had sent."""
    by_writer = d["readback"].get("by_writer") or []
    groups: dict[str, list[dict[str, Any]]] = {}
    for w in d["writers_died"]:
        groups.setdefault(w["how"], []).append(w)
    parts = []
    for how, ws in groups.items():
        read = [by_writer[w["writer"]] for w in ws if w["writer"] < len(by_writer)]
        sent = sum(sum(r["logged"].values()) for r in read)
        lost = sent - sum(sum(r["found"].values()) for r in read)
        statuses = Counter(str(r["status"] or "not read") for r in read)
        ids = ", ".join(str(w["writer"]) for w in ws[:8]) + (", ..." if len(ws) > 8 else "")
        epochs = sorted(w["epochs_logged"] for w in ws)
        parts.append(f"{len(ws)} {how} (writer {ids}) after {epochs[0]}-{epochs[-1]} epochs: "
                     f"{sum(w['points_never_sent'] for w in ws):,} points never sent; runs read back "
                     + ", ".join(f"{k} x{v}" for k, v in statuses.items())
                     + f", {lost} of the {sent} items they had sent lost")
    return "; ".join(parts) or "none"


def _row(store: str, d: dict[str, Any]) -> list[str]:
    if not d.get("ran"):
        return [store, str(d["writers"]), "not run: " + d.get("reason", ""), *[""] * 8]
    rb, mem = d["readback"], d["memory"]
    errors = f"{d['errors']} of {d['calls']}" + (f" ({'; '.join(f'{k} x{v}' for k, v in d['error_kinds'].items())})"
                                                 if d["errors"] else "")
    rate = f"{d['points_per_s']:,.0f}" if d["points_per_s"] else "n/a"
    return [store, str(d["writers"]), f"{d['all_finished_s']:.1f} s (+{d['import_s']:.1f} s start-up)",
            _ms(d["latency"]["log"]), _ms(d["all_calls"]), rate, errors, str(d["retries"]), _died(d),
            f"{rb['runs_read']}/{rb['runs_sent']} runs; points {rb['found']['points']}/{rb['logged']['points']}, "
            f"params {rb['found']['params']}/{rb['logged']['params']}, files {rb['found']['artifacts']}/"
            f"{rb['logged']['artifacts']}; lost {rb['lost']}" + (f"; read failed: {rb['read_failed'][0]}"
                                                                  if rb["read_failed"] else ""),
            f"{mem['peak_total_rss_mb']:,.0f} MB in {mem['peak_processes']} processes"
            + (f"; per writer {mem['per_writer_peak_mb']:,.0f} MB sampled, <= {mem['per_writer_peak_own_mb']:,.0f} MB "
               f"by each process's own peak" if mem.get("per_writer_peak_own_mb") else "")
            + (f" (store {mem['store_peak_rss_mb']:,.0f} MB)" if mem.get("store_peak_rss_mb") else "")]


HEADER = ["store", "writers", "all runs finished", "log_metrics p50/p95/p99 ms", "any call p50/p95/p99 ms",
          "points/s", "errors", "HTTP retries", "writers that died", "read back (found/sent)", "writers' peak memory"]


def report_sections(report: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The report's "Team scale" tables (empty when the tier did not run)."""
    scale = report.get("team_scale")
    if not scale:
        return []
    plan = scale.get("plan", {})
    rows, per_op = [], []
    for store, s in scale.get("stores", {}).items():
        if "levels" not in s:
            rows.append([store, "", ("skipped: " + s["skipped"]) if "skipped" in s else "FAILED: " + str(s.get(
                "failed")), *[""] * 8])
            continue
        for d in s["levels"]:
            rows.append(_row(store, d))
            if d.get("ran"):
                per_op.append([store, str(d["writers"]), *[_ms(d["latency"][op]) for op in OPS]])
    stores = "; ".join(f"{k}: {v['store']}" for k, v in scale.get("stores", {}).items() if "store" in v)
    note = (f"N writer processes at once, each a run: {plan.get('params')} params, {plan.get('epochs')} epochs x "
            f"{plan.get('metrics_per_epoch')} metrics (one call per epoch, {plan.get('epoch_s')} s between epochs), "
            f"{len(plan.get('files', {}))} small files and a torch state_dict ({plan.get('model_bytes')} bytes) as "
            f"artifacts. {stores}. All on this machine ({plan.get('cores')} cores): writers, server and database "
            "share its CPUs, so latencies grow with N partly because the writers' own CPU competes with the store's. "
            "'All runs finished': from the go signal (every writer had imported its client) to the last exit. "
            "Read back: every run from its store, compared with what its writer's journal says it sent. "
            f"Budget {plan.get('budget_s_per_store')} s per store; a level not run says why.")
    return [("11. Team scale", note, HEADER, rows),
            ("11b. Team scale: per-call latency", "p50 / p95 / p99 in ms of each call that succeeded.",
             ["store", "writers", *OPS], per_op)]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One terminal line per store: the largest level that ran, and the levels that did not."""
    lines = []
    for store, s in (report.get("team_scale") or {}).get("stores", {}).items():
        ran = [d for d in s.get("levels", []) if d.get("ran")]
        if not ran:
            lines.append(f"team scale {store}: " + str(s.get("skipped") or s.get("failed") or "no level ran"))
            continue
        d = ran[-1]
        lines.append(f"team scale {store}: {d['writers']} writers: all finished in {d['all_finished_s']:.1f} s, "
                     f"log_metrics p95 {_ms(d['latency']['log']).split(' / ')[1]} ms, {d['errors']} errors, "
                     f"{d['readback']['lost']} lost, {len(d['writers_died'])} writers died"
                     + "".join(f"; {x['writers']} writers not run ({x['reason']})"
                               for x in s["levels"] if not x.get("ran")))
    return lines


# -- entry point --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writer", action="store_true", help="run one writer (the orchestrator starts them)")
    parser.add_argument("--backend", choices=STORES, default="mlflow-sqlite")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--uri")
    parser.add_argument("--experiment-id")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--params", type=int, default=30)
    parser.add_argument("--epoch-s", type=float, default=0.0)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writer: its journal; else: the result's JSON")
    parser.add_argument("--go", type=Path)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--levels", default="1,4,16,64", help="orchestrator: comma list of writer counts")
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--budget", type=float, default=900.0, help="orchestrator: seconds per store")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.writer:
        writer_main(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = ScalePlan(levels=tuple(int(x) for x in args.levels.split(",")), stores=tuple(args.stores.split(",")),
                     epochs=args.epochs, params=args.params, epoch_s=args.epoch_s, budget_s=args.budget)
    result = measure(plan, args.out.parent / "team-scale")
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
