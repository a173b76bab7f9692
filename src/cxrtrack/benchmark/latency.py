"""Per-call latency of each tracker, through our tracker layer and through the raw client.

For one backend per process (``python -m cxrtrack.benchmark.latency --backend mlflow-sqlite ...``;
a fresh process so no client state leaks from one backend into the next), it alternates runs opened
through the layer (``TrackerGroup([MLflowTracker])``: the code the trainer uses) and runs driven by
the raw client calls that do the same work, and times every call:

    start     open a run and record the run's config (84 params) and tags
    log_metrics   one per-epoch row of the trainer (the same keys and values as a real run)
    log_params    a batch of 50 new params
    artifact_1mb, artifact_20mb   a file of random bytes (incompressible)
    image     a PNG plot (the training-curves figure of a real run)
    finish    close the run (flushing whatever the client queued)

The difference between the two columns is the layer's own cost; as both sides also carry the noise of
the client and the store, the layer's own cost is also measured alone, precisely: the same layer
code with the client library replaced by a stub that returns at once (``layer_own``, thousands of
calls). The first run of each process pays one-off costs (creating the store's tables, starting W&B's
service): it is reported apart as ``cold_start_s`` and left out of the medians.

Backends: ``mlflow-sqlite`` (synchronous), ``mlflow-sqlite-async`` (MLflow's asynchronous logging),
``mlflow-server`` (``--uri`` of a running ``mlflow server``), ``wandb-offline``, ``wandb-online``
(needs an API key and network).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import yaml

from cxrtrack.tracking import build_tracker
from cxrtrack.tracking.base import FINISHED, RunInfo, TrackerGroup

OPS = ("start", "log_metrics", "log_params", "artifact_1mb", "artifact_20mb", "image", "finish")
BACKENDS = ("mlflow-sqlite", "mlflow-sqlite-async", "mlflow-server", "wandb-offline", "wandb-online")


def summarise(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=float)
    return {"n": int(arr.size), "median_s": float(np.median(arr)), "p95_s": float(np.percentile(arr, 95)),
            "min_s": float(arr.min()), "max_s": float(arr.max())}


class Workload:
    """What every timed call sends: taken from a real run of the compare (its tracked.json/config.yaml)."""

    def __init__(self, run_dir: Path, scratch: Path):
        record = json.loads((run_dir / "tracked.json").read_text())
        self.cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        self.params_flat: dict[str, Any] = record["params"]
        self.tags: dict[str, str] = record["tags"]
        from cxrtrack.config import unflatten

        self.config = unflatten(self.params_flat)
        metrics = record["metrics"]
        self.row = {key: float(points[-1][1]) for key, points in metrics.items()}
        self.extra_params = {f"bench.p{i:02d}": float(i) / 7 for i in range(50)}
        scratch.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        self.files = {}
        for name, size in (("artifact_1mb", 2**20), ("artifact_20mb", 20 * 2**20)):
            path = scratch / f"{name}.bin"
            if not path.exists() or path.stat().st_size != size:
                path.write_bytes(rng.bytes(size))
            self.files[name] = path
        self.image = run_dir / "plots" / "training_curves.png"


class _Bench:
    """One backend: every op in :data:`OPS` through the layer (``layer_*``, the same for every backend: a
    :class:`TrackerGroup` as the trainer gets it) and through the raw client (``raw_*``, per backend)."""

    backend = ""  # the tracker name build_tracker knows
    cfg: dict[str, Any]  # the backend's tracking.<backend> section
    experiment = "cxr-latency"  # MLflow experiment / W&B project

    def __init__(self, work: Workload, store: Path, uri: str | None):
        self.work, self.store, self.uri = work, store, uri
        self.step = 0
        self.batch = 0

    def params_batch(self) -> dict[str, float]:
        self.batch += 1
        return {f"{k}.b{self.batch}": v for k, v in self.work.extra_params.items()}

    def run_info(self, name: str) -> RunInfo:
        return RunInfo(name, copy.deepcopy(self.work.config), dict(self.work.tags), job_type="benchmark")

    def project_group(self, backend: str, backend_cfg: dict[str, Any], experiment: str) -> TrackerGroup:
        """The backend exactly as the trainer gets it (``build_tracker``: MLflow inside its spool wrapper)."""
        cfg = copy.deepcopy(self.work.cfg)
        cfg["experiment"] = experiment
        cfg["output_dir"] = str(self.store / "outputs")
        cfg["tracking"][backend] = backend_cfg
        return build_tracker(backend, cfg)

    # the layer
    def _new_group(self) -> TrackerGroup:
        return self.project_group(self.backend, self.cfg, self.experiment)

    def layer_start(self, name):
        self.group = self._new_group()
        self.group.start_run(self.run_info(name))

    def layer_log_metrics(self):
        self.step += 1
        self.group.log_metrics(self.work.row, step=self.step)

    def layer_log_params(self, batch):
        self.group.log_params({"bench": batch})

    def layer_artifact(self, path):
        self.group.log_artifact(path, "bench")

    def layer_image(self):
        self.group.log_image(self.work.image, "plots/training_curves.png")

    def layer_finish(self):
        self.group.end_run(FINISHED)
        return self.group.errors


class MLflowBench(_Bench):
    backend = "mlflow"

    def __init__(self, work, store, uri, asynchronous=False):
        super().__init__(work, store, uri)
        import mlflow

        self.mlflow = mlflow
        self.sync = not asynchronous
        self.uri = uri or f"sqlite:///{store / 'mlflow.db'}"
        self.cfg = {**work.cfg["tracking"]["mlflow"], "tracking_uri": self.uri, "async_logging": asynchronous,
                    "artifact_location": str(store / "mlartifacts"), "registered_model_name": None}
        self.params_strings = {k: "None" if v is None else str(v) for k, v in work.params_flat.items()}

    # raw client: the calls a user of MLflow would write to do the same
    def raw_start(self, name):
        mlflow = self.mlflow
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.get_experiment_by_name(self.experiment)
        if self.cfg.get("system_metrics"):
            mlflow.set_system_metrics_sampling_interval(self.cfg.get("system_metrics_interval") or 10)
        mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name,
                         tags={**self.work.tags, "job_type": "benchmark"},
                         log_system_metrics=bool(self.cfg.get("system_metrics")))
        mlflow.log_params(self.params_strings, synchronous=self.sync)

    def raw_log_metrics(self):
        self.step += 1
        self.mlflow.log_metrics(self.work.row, step=self.step, synchronous=self.sync)

    def raw_log_params(self, batch):
        self.mlflow.log_params({f"bench.{k}": v for k, v in batch.items()}, synchronous=self.sync)

    def raw_artifact(self, path):
        self.mlflow.log_artifact(str(path), artifact_path="bench")

    def raw_image(self):
        self.mlflow.log_artifact(str(self.work.image), artifact_path="plots")

    def raw_finish(self):
        self.mlflow.end_run()  # waits for queued asynchronous logging
        return {}


class WandbBench(_Bench):
    backend = "wandb"

    def __init__(self, work, store, uri, mode="offline"):
        super().__init__(work, store, uri)
        import wandb

        self.wandb = wandb
        self.mode = mode
        self.cfg = {**work.cfg["tracking"]["wandb"], "dir": str(store), "mode": mode}

    def layer_artifact(self, path):
        # the layer collects files and logs them as one artifact version: time the call and the upload
        super().layer_artifact(path)
        self.group.flush()

    def raw_start(self, name):
        wandb = self.wandb
        tags = self.work.tags
        self.run = wandb.init(
            mode=self.mode, project=self.experiment, name=name, dir=str(self.store), job_type="benchmark",
            config={**self.work.config, "run_tags": tags},
            tags=[f"{k}:{v}"[:64] for k, v in tags.items() if k in ("dataset_source", "config", "device")],
            settings=wandb.Settings(silent=True, init_timeout=float(self.cfg.get("init_timeout") or 30),
                                    x_stats_sampling_interval=float(self.cfg.get("system_metrics_interval") or 15)),
        )
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def raw_log_metrics(self):
        self.step += 1
        self.run.log({**self.work.row, "epoch": self.step})

    def raw_log_params(self, batch):
        self.run.config.update({"bench": batch}, allow_val_change=True)

    def raw_artifact(self, path):
        artifact = self.wandb.Artifact(f"raw-{self.run.id}", type="run-files")
        artifact.add_file(str(path), name=f"bench/{path.name}")
        self.run.log_artifact(artifact)

    def raw_image(self):
        self.run.log({"plots/training_curves": self.wandb.Image(str(self.work.image))})

    def raw_finish(self):
        self.run.finish()
        return {}


def make_bench(backend: str, work: Workload, store: Path, uri: str | None) -> _Bench:
    if backend == "mlflow-sqlite":
        return MLflowBench(work, store, None)
    if backend == "mlflow-sqlite-async":
        return MLflowBench(work, store, None, asynchronous=True)
    if backend == "mlflow-server":
        if not uri:
            raise ValueError("mlflow-server needs --uri of a running server")
        return MLflowBench(work, store, uri)
    if backend == "wandb-offline":
        return WandbBench(work, store, None, "offline")
    if backend == "wandb-online":
        return WandbBench(work, store, None, "online")
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _one_run(bench: _Bench, side: str, name: str, times: dict[str, list[float]], calls: dict[str, int]) -> dict:
    def t(op: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[op].append(time.perf_counter() - start)
        return result

    t("start", getattr(bench, f"{side}_start"), name)
    for _ in range(calls["log_metrics"]):
        t("log_metrics", getattr(bench, f"{side}_log_metrics"))
    for _ in range(calls["log_params"]):
        t("log_params", getattr(bench, f"{side}_log_params"), bench.params_batch())
    for op in ("artifact_1mb", "artifact_20mb"):
        for _ in range(calls[op]):
            t(op, getattr(bench, f"{side}_artifact"), bench.work.files[op])
    for _ in range(calls["image"]):
        t("image", getattr(bench, f"{side}_image"))
    return t("finish", getattr(bench, f"{side}_finish")) or {}


class _Stub:
    """Stands in for the ``mlflow``/``wandb`` module: every attribute, call and item is accepted at once."""

    def __init__(self, folder: Path):
        self._folder = str(folder)

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __setitem__(self, key, value):
        pass

    def __contains__(self, item):  # "key in experiment.tags": everything is already there
        return True

    def __iter__(self):
        return iter(())

    def __fspath__(self):
        return self._folder

    def __str__(self):
        return "stub"


def layer_own_cost(bench: _Bench, n: int = 300) -> dict[str, dict[str, float]]:
    """The layer's own time per op: our code path with the client replaced by :class:`_Stub`."""
    stub = _Stub(bench.store / "stub")

    def start(name):  # real trackers in a real group, cut off from the client library
        group = bench._new_group()
        for tracker in group.trackers:
            tracker.setup()  # the real import, once (cached by Python afterwards)
            backend = getattr(tracker, "inner", tracker)  # MLflow sits inside its spool wrapper
            for attr in ("_mlflow", "_wandb"):
                if attr in vars(backend):
                    setattr(backend, attr, stub)
            backend.setup = lambda: None
            if "ping" in dir(backend):
                backend.ping = lambda *a, **k: True  # the /health probe of a server is network, not layer
            backend.cfg = {**backend.cfg, "verify_offline": False}  # measured on its own: verify_offline_s
        bench.group = group
        group.start_run(bench.run_info(name))

    # the stale-run housekeeping at start is a store query (client work), not the layer's own code
    from cxrtrack.tracking import mlflow_tracker

    samples: dict[str, list[float]] = defaultdict(list)
    with mock.patch.object(mlflow_tracker, "close_orphans", lambda *a, **k: None):
        _own_cost_loop(bench, start, samples, n)
    return {op: summarise(v) for op, v in samples.items()}


def _own_cost_loop(bench: _Bench, start, samples: dict[str, list[float]], n: int) -> None:
    for i in range(n):
        # a run's first log_metrics also declares each new key's epoch axis (W&B define_metric, once per key and
        # run): untimed here, so log_metrics is timed as every later epoch pays it
        for op, fn, args in (("start", start, (f"stub-{i}",)), (None, bench.layer_log_metrics, ()),
                             ("log_metrics", bench.layer_log_metrics, ()),
                             ("log_params", bench.layer_log_params, (bench.params_batch(),)),
                             ("artifact_1mb", bench.layer_artifact, (bench.work.files["artifact_1mb"],)),
                             ("artifact_20mb", bench.layer_artifact, (bench.work.files["artifact_20mb"],)),
                             ("image", bench.layer_image, ()), ("finish", bench.layer_finish, ())):
            t = time.perf_counter()
            fn(*args)
            if op is not None:
                samples[op].append(time.perf_counter() - t)


def verify_offline_cost(bench: WandbBench, n: int = 5) -> dict[str, float]:
    """Our W&B layer reads each offline run back at its end (``tracking.wandb.verify_offline``: W&B's writer fails
    silently on a full disk): the part of the layer's finish that is this check, timed on a finished run."""
    from cxrtrack.tracking.wandb_tracker import WandbTracker

    tracker = bench._new_group().trackers[0]
    if not isinstance(tracker, WandbTracker):
        raise TypeError(f"a W&B bench tracks with a WandbTracker, not a {type(tracker).__name__}")
    tracker.setup()
    runs = sorted(bench.store.glob("wandb/offline-run-*"))
    if not runs:
        return {}
    tracker._run_dir = runs[-1]
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        tracker._verify_offline(0)
        samples.append(time.perf_counter() - t)
    return summarise(samples)


def measure(backend: str, run_dir: Path, store: Path, uri: str | None = None, cycles: int = 12,
            calls: dict[str, int] | None = None) -> dict[str, Any]:
    """Time every op through the layer and the raw client, alternating; returns samples and summaries."""
    calls = {"log_metrics": 10, "log_params": 2, "artifact_1mb": 2, "artifact_20mb": 1, "image": 2, **(calls or {})}
    work = Workload(run_dir, store / "files")
    bench = make_bench(backend, work, store, uri)
    warm: dict[str, list[float]] = defaultdict(list)
    for side in ("layer", "raw"):  # one-off costs (tables, experiment, service start), reported apart
        _one_run(bench, side, f"warm-up-{side}", warm, calls)
    samples: dict[str, dict[str, list[float]]] = {"layer": defaultdict(list), "raw": defaultdict(list)}
    errors: dict[str, int] = {}
    for cycle in range(cycles):
        order = ("layer", "raw") if cycle % 2 == 0 else ("raw", "layer")  # alternate: drift hits both sides
        for side in order:
            for name, n in _one_run(bench, side, f"{side}-{cycle}", samples[side], calls).items():
                errors[name] = errors.get(name, 0) + n
    own = layer_own_cost(bench)
    verify = verify_offline_cost(bench) if isinstance(bench, WandbBench) and bench.mode == "offline" else None
    ops = {}
    for op in OPS:
        layer, raw = summarise(samples["layer"][op]), summarise(samples["raw"][op])
        ops[op] = {"layer": layer, "raw": raw, "layer_own": own[op],
                   # paired medians: noisy, both sides carry the store's jitter
                   "layer_over_raw": layer["median_s"] / raw["median_s"],
                   # the layer's own cost (stubbed client, thousands of calls) on top of the raw call
                   "own_over_raw": (raw["median_s"] + own[op]["median_s"]) / raw["median_s"]}
    return {"backend": backend, "cold_start_s": warm["start"][0], "cold_finish_s": warm["finish"][0], "ops": ops,
            "verify_offline": verify,
            "calls_per_run": calls, "cycles": cycles, "layer_errors": errors,
            "samples": {side: dict(v) for side, v in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--run-dir", required=True, type=Path, help="outputs/<run> of a finished run (the workload)")
    parser.add_argument("--store", required=True, type=Path, help="folder for this backend's store and files")
    parser.add_argument("--uri", help="tracking server URI (mlflow-server)")
    parser.add_argument("--cycles", type=int, default=12, help="runs per side (layer, raw)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    result = measure(args.backend, args.run_dir, args.store, args.uri, args.cycles)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from cxrtrack.cli import exit_fast

    main()
    exit_fast(0)  # its result is written: skip ~2 s of interpreter teardown per subprocess of `make compare`
