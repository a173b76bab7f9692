"""How a tracker's cost grows with the work: metric points in a run, and runs in a store.

``points``: one run logs N metric points (10 keys x N/10 steps), batched as each client allows
(MLflow ``log_batch``: up to 1,000 metrics per call; W&B: one ``run.log`` row of 10 keys per step).
Measured: time to log them and close the run, bytes the store grew by, time to read them all back.

``runs``: a store gets 10, then 100, then 1,000 runs (5 params and 5 metrics each); at each size we
time listing every run and a filtered, ordered search. W&B has no local run index: searching runs is a
W&B server API (``wandb.Api().runs``), so offline it is not measurable and is reported as such.

One backend per process: ``python -m cxrtrack.benchmark.scaling --backend mlflow-sqlite --what points``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from cxrtrack.benchmark.runs import disk_bytes

KEYS = [f"train/m{i}" for i in range(10)]


def _mlflow_client(uri: str):
    import mlflow

    return mlflow, mlflow.MlflowClient(tracking_uri=uri)


def _mlflow_experiment(client, name: str, store: Path, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (store / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def mlflow_points(uri: str, store: Path, sizes: list[int], db: Path) -> list[dict[str, Any]]:
    """``db``: the SQLite file behind ``uri`` (the server's own database for a server), to measure growth."""
    from mlflow.entities import Metric

    _, client = _mlflow_client(uri)
    experiment_id = _mlflow_experiment(client, "cxr-scaling-points", store, uri)
    out = []
    for n in sizes:
        before = disk_bytes(db)
        start = time.perf_counter()
        run = client.create_run(experiment_id, run_name=f"points-{n}")
        now = int(time.time() * 1000)
        points = [Metric(key, 1.0 / (step + 1) + i, now, step) for step in range(n // len(KEYS))
                  for i, key in enumerate(KEYS)]
        for i in range(0, len(points), 1000):  # MLflow's limit per log_batch call
            client.log_batch(run.info.run_id, metrics=points[i:i + 1000])
        client.set_terminated(run.info.run_id)
        log_s = time.perf_counter() - start
        start = time.perf_counter()
        read = sum(len(client.get_metric_history(run.info.run_id, key)) for key in KEYS)
        read_s = time.perf_counter() - start
        out.append({"points": n, "log_s": log_s, "calls": -(-len(points) // 1000), "read_s": read_s,
                    "read_points": read, "bytes": disk_bytes(db) - before})
    return out


def wandb_points(store: Path, sizes: list[int]) -> list[dict[str, Any]]:
    import wandb

    from cxrtrack.tracking.readback import read_wandb

    warm = wandb.init(mode="offline", project="cxr-scaling-points", name="warm-up", dir=str(store),
                      settings=wandb.Settings(silent=True, x_disable_stats=True))
    warm.finish()  # the first init of a process starts W&B's service: keep that one-off cost out
    out = []
    for n in sizes:
        start = time.perf_counter()
        run = wandb.init(mode="offline", project="cxr-scaling-points", name=f"points-{n}", dir=str(store),
                         settings=wandb.Settings(silent=True, x_disable_stats=True))
        run.define_metric("epoch")
        run.define_metric("train/*", step_metric="epoch")
        for step in range(n // len(KEYS)):
            run.log({**{key: 1.0 / (step + 1) + i for i, key in enumerate(KEYS)}, "epoch": step})
        run_dir = Path(run.settings.sync_dir)
        run.finish()
        log_s = time.perf_counter() - start
        start = time.perf_counter()
        record = read_wandb(run_dir)
        read_s = time.perf_counter() - start
        out.append({"points": n, "log_s": log_s, "calls": n // len(KEYS), "read_s": read_s,
                    "read_points": sum(len(record.metrics.get(key, [])) for key in KEYS),
                    "bytes": disk_bytes(run_dir)})
    return out


def mlflow_runs(uri: str, store: Path, sizes: list[int], repeats: int = 3) -> list[dict[str, Any]]:
    from mlflow.entities import Metric, Param

    _, client = _mlflow_client(uri)
    experiment_id = _mlflow_experiment(client, "cxr-scaling-runs", store, uri)
    made, out = 0, []
    for n in sorted(sizes):
        start = time.perf_counter()
        while made < n:
            run = client.create_run(experiment_id, run_name=f"run-{made}")
            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id,
                             metrics=[Metric(f"m{i}", (made * 7 + i) % 100 / 100, now, 0) for i in range(5)],
                             params=[Param(f"p{i}", str(made + i)) for i in range(5)])
            client.set_terminated(run.info.run_id)
            made += 1
        create_s = time.perf_counter() - start
        list_s, search_s = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            listed = _all_runs(client, experiment_id, "")
            list_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            found = _all_runs(client, experiment_id, "metrics.m0 > 0.5", order_by=["metrics.m1 DESC"])
            search_s.append(time.perf_counter() - t)
        out.append({"runs": n, "create_s": create_s, "list_s": statistics.median(list_s), "listed": listed,
                    "search_s": statistics.median(search_s), "found": found})
    return out


def _all_runs(client, experiment_id: str, filter_string: str, order_by=None) -> int:
    count, token = 0, None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, order_by=order_by,
                                  page_token=token)
        count += len(page)
        token = page.token
        if not token:
            return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True, choices=("mlflow-sqlite", "mlflow-server", "wandb-offline"))
    parser.add_argument("--what", required=True, choices=("points", "runs"))
    parser.add_argument("--sizes", required=True, help="comma list, e.g. 1000,10000,100000")
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--uri", help="tracking server URI (mlflow-server)")
    parser.add_argument("--db", type=Path, help="the server's SQLite file (mlflow-server), to measure its growth")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args.store.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    uri = args.uri or f"sqlite:///{(args.store / 'mlflow.db').resolve()}"
    if args.backend == "wandb-offline":
        if args.what == "runs":
            raise SystemExit("W&B has no local run index: searching runs needs the W&B server")
        result = wandb_points(args.store, sizes)
    elif args.what == "points":
        result = mlflow_points(uri, args.store, sizes, args.db or args.store / "mlflow.db")
    else:
        result = mlflow_runs(uri, args.store, sizes)
    args.out.write_text(json.dumps({"backend": args.backend, "what": args.what, "results": result}, indent=1))


if __name__ == "__main__":
    from cxrtrack.cli import exit_fast

    main()
    exit_fast(0)  # its result is written: skip ~2 s of interpreter teardown per subprocess of `make compare`
