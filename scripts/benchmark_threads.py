#!/usr/bin/env python
"""Images per second of 1, 2, 3 ... trainings at once, per thread setting (make threads-benchmark).

Several torch processes on a small machine oversubscribe its cores: each process starts one OpenMP thread
per core, and threads that busy-wait (OpenMP's default, active wait policy) steal the cores the other
processes' threads need. This measures, for each concurrency level (--concurrency) and each variant:

  default       what a process gets without settings: torch's threads (one per core), OpenMP's active wait
  one_thread    threads=1 in every process (OMP_NUM_THREADS=1)
  passive       torch's threads, OMP_WAIT_POLICY=PASSIVE (idle threads sleep instead of spinning)
  auto          the project's `threads: auto` (cxrtrack.threads: one thread per free core at start-up,
                passive wait)

Every process trains the real training step (the Trainer's own epoch) of --config for --warmup + --epochs
epochs, all processes of one cell starting at once; a cell's figure is the median over its processes of each
process's median epoch speed. "Fair share" is the idle speed of `default` alone divided by the number of
processes: what each would get if running them together lost nothing; a ratio above 1 means running them
together beats running them one after the other. Cells are interleaved over --repeats (a load spike hits every
variant alike). Writes outputs/threads/benchmark.md and benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "default": {},
    "one_thread": {"OMP_NUM_THREADS": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "auto": {"CXRTRACK_THREADS": "auto"},
}
_CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CXRTRACK_THREADS")


def child(args) -> int:
    """One training process: warm up, then print the speed of each measured epoch as JSON."""
    from cxrtrack.threads import apply_threads

    setting = os.environ.get("CXRTRACK_THREADS")
    resolved = apply_threads(setting) if setting else None  # before torch is imported, like scripts/train.py
    import logging

    import torch

    from cxrtrack.config import load_config
    from cxrtrack.data.dataset import DataCache
    from cxrtrack.data.loading import build_loaders
    from cxrtrack.models import build_model
    from cxrtrack.training.recipe import Recipe
    from cxrtrack.training.trainer import Trainer, build_criterion
    from cxrtrack.utils import select_device

    logging.disable(logging.INFO)
    values = {"training.epochs": 1000, "tracking.tracker": "none"}
    if args.data:
        values["data.path"] = args.data
    cfg = load_config(args.config, values=values)
    torch.manual_seed(cfg["seed"])
    device = select_device(cfg["device"])
    data = DataCache().get(cfg["data"], cfg["seed"])
    trainer = Trainer(build_model(cfg["model"], cfg["data"]), build_loaders(data, cfg, device), cfg["training"], device,
                      Path("/nonexistent/never-written.pt"),
                      criterion=build_criterion(cfg["training"], data.train.labels, device),
                      recipe=Recipe(cfg, len(data.class_names)))
    speeds = []
    for epoch in range(1, args.warmup + args.epochs + 1):
        out = trainer.train_one_epoch(epoch)
        if epoch > args.warmup:
            speeds.append(out["images_per_s"])
    print(json.dumps({"images_per_s": speeds, "threads": torch.get_num_threads(), "resolved": resolved}), flush=True)
    return 0


def cell(args, variant: str, n: int) -> dict:
    """``n`` processes of ``variant`` at once: their speeds."""
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(VARIANTS[variant], TQDM_DISABLE="1")
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--epochs", str(args.epochs),
           "--warmup", str(args.warmup)] + (["--data", args.data] if args.data else [])
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    per_process = [statistics.median(o["images_per_s"]) for o in outs]
    return {"per_process": per_process, "median": statistics.median(per_process), "total": sum(per_process),
            "threads": [o["threads"] for o in outs], "wall_s": time.perf_counter() - start,
            "load_after": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("--data", help="dataset folder (default: the Kaggle download, else the synthetic set)")
    parser.add_argument("--concurrency", default="1,2,3", help="numbers of trainings at once (default 1,2,3)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs per process (default 1)")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per process (default 3)")
    parser.add_argument("--out", default="outputs/threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    levels = [int(n) for n in args.concurrency.split(",")]
    print(f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, dict[int, list[dict]]] = {v: {n: [] for n in levels} for v in names}
    for rep in range(args.repeats):
        for n in levels:
            for variant in names:  # interleaved
                result = cell(args, variant, n)
                runs[variant][n].append(result)
                print(f"repeat {rep + 1}/{args.repeats}, {n} at once, {variant}: "
                      + ", ".join(f"{s:.0f}" for s in result["per_process"]) + f" img/s per process "
                      f"(threads {result['threads']}, load {result['load_after']:.1f})", flush=True)
    idle = statistics.median(r["median"] for r in runs[names[0]][levels[0]]) if 1 in levels else None
    lines = [f"# Concurrent trainings: images/s per process ({os.cpu_count()} cores, {args.config}, "
             f"{args.repeats} interleaved repeats, {args.epochs} measured epochs after {args.warmup} warm-up)", "",
             f"Fair share = the idle speed of `{names[0]}` alone ({idle:.0f} img/s) / the number of processes."
             if idle else "", "",
             "| processes | variant | threads each | img/s per process (median; repeats) | total img/s "
             "| ratio to fair share |",
             "|---|---|---|---|---|---|"]
    for n in levels:
        for variant in names:
            cells = runs[variant][n]
            med = statistics.median(c["median"] for c in cells)
            total = statistics.median(c["total"] for c in cells)
            fair = f"{med / (idle / n):.2f}" if idle else "-"
            lines.append(f"| {n} | {variant} | {cells[0]['threads'][0]} | {med:.0f} ("
                         + " / ".join(f"{c['median']:.0f}" for c in cells) + f") | {total:.0f} | {fair} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
