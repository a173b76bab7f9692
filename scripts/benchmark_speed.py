#!/usr/bin/env python
"""Images per second of the training step (make speed-benchmark): the current path against each speed option.

For each image size, every variant trains CustomCXRNet for whole epochs on the project's data (the Kaggle
download, or the synthetic set) exactly as `scripts/train.py` would (the Trainer's own epoch: batches from
the loaders, augmentation, forward, loss, backward, optimiser step, metrics). Variants are interleaved and
repeated (--repeats), so that the load of a shared machine hits them alike; each ratio is computed within
one repeat against the current path, and the median and range over the repeats are reported. The first
epochs of every variant are a warm-up (torch.compile compiles there: its compile time is reported apart).

  current        the path before issue 9: DataLoader, per-image torchvision augmentation on the CPU, fp32, NCHW
  channels_last  training.channels_last=true
  compile        training.compile=true (torch.compile; needs a C compiler on CPU)
  bf16           training.precision=bf16 (autocast; fast only on CPUs with AVX512-BF16/AMX, or GPUs)
  batched_aug    data.pipeline=batched (the cache on the device, kornia augmentation of whole batches)
  no_aug         data.augment.enabled=false: the same step without augmentation (what augmentation costs)

Writes outputs/speed/benchmark.md and benchmark.json.

--check-results VARIANT trains the config end to end with --seeds seeds, once with the current path and once
with VARIANT (tracker none), and compares the validation and test metrics: a speed option becomes a default
only if the difference of the means is within the seeds' spread (results.md, results.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

VARIANTS = {
    "current": {"training.precision": "fp32", "data.pipeline": "per_image"},
    "channels_last": {"training.precision": "fp32", "training.channels_last": True},
    "compile": {"training.precision": "fp32", "training.compile": True},
    "bf16": {"training.precision": "bf16"},
    "batched_aug": {"training.precision": "fp32", "data.pipeline": "batched"},
    "no_aug": {"training.precision": "fp32", "data.augment.enabled": False},
    "bf16_channels_last": {"training.precision": "bf16", "training.channels_last": True},
}


def cpu_facts() -> dict[str, str]:
    import torch

    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Model name")), "?")
    return {"cpu": model, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": str("avx512_bf16" in flags), "amx_bf16": str("amx_bf16" in flags),
            "cuda": str(torch.cuda.is_available()), "python": platform.python_version()}


class Bench:
    """One variant at one size: a Trainer ready to run epochs."""

    def __init__(self, config: str, size: int, overrides: dict, data_path: str | None, cache):
        import torch

        from cxrtrack.config import load_config
        from cxrtrack.data.loading import build_loaders
        from cxrtrack.models import build_model
        from cxrtrack.training.recipe import Recipe
        from cxrtrack.training.trainer import Trainer, build_criterion
        from cxrtrack.utils import select_device

        values = {"data.image_size": size, "training.epochs": 1000, **overrides}
        if data_path:
            values["data.path"] = data_path
        cfg = load_config(config, values=values)
        torch.manual_seed(cfg["seed"])
        self.device = select_device(cfg["device"])
        data = cache.get(cfg["data"], cfg["seed"])
        model = build_model(cfg["model"], cfg["data"])
        self.trainer = Trainer(model, build_loaders(data, cfg, self.device), cfg["training"], self.device,
                               Path("/nonexistent/never-written.pt"),
                               criterion=build_criterion(cfg["training"], data.train.labels, self.device),
                               recipe=Recipe(cfg, len(data.class_names)))
        self.epoch = 0
        self.n = len(data.train)

    def run_epoch(self) -> tuple[float, float]:
        """(images per second, seconds) of one training epoch."""
        self.epoch += 1
        start = time.perf_counter()
        out = self.trainer.train_one_epoch(self.epoch)
        return out["images_per_s"], time.perf_counter() - start


def main() -> int:
    from cxrtrack.cli import setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("--data", help="dataset folder (default: the Kaggle download, else the synthetic set)")
    parser.add_argument("--sizes", default="128,224", help="comma-separated image sizes (default 128,224)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up epochs per variant before measuring (default 1)")
    parser.add_argument("--epochs", type=int, default=1, help="measured epochs per variant per repeat (default 1)")
    parser.add_argument("--out", default="outputs/speed")
    parser.add_argument("--check-results", metavar="VARIANT", help="train end to end with and without VARIANT instead")
    parser.add_argument("--reference", default="current", help="--check-results: the variant compared against")
    parser.add_argument("--seeds", type=int, default=3, help="--check-results: seeds per variant (default 3)")
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("cxrtrack").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from cxrtrack.data.dataset import DataCache

    facts = cpu_facts()
    print("Machine:", ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    if args.check_results:
        return check_results(args, facts)
    cache = DataCache()
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    results: dict[str, dict] = {}
    for size in sizes:
        benches, compile_s, errors = {}, {}, {}
        for name in names:  # build and warm up (compilation happens here)
            try:
                bench = Bench(args.config, size, VARIANTS[name], args.data, cache)
                start = time.perf_counter()
                for _ in range(args.warmup):
                    bench.run_epoch()
                compile_s[name] = time.perf_counter() - start
                benches[name] = bench
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(f"{size}px {name}: cannot run here ({errors[name]})", flush=True)
        speeds: dict[str, list[float]] = {n: [] for n in benches}
        ratios: dict[str, list[float]] = {n: [] for n in benches}
        for rep in range(args.repeats):
            this = {}
            for name, bench in benches.items():  # interleaved: every variant once per repeat
                this[name] = statistics.median(bench.run_epoch()[0] for _ in range(args.epochs))
                speeds[name].append(this[name])
            for name in benches:
                if "current" in this:
                    ratios[name].append(this[name] / this["current"])
            print(f"{size}px repeat {rep + 1}/{args.repeats}: "
                  + ", ".join(f"{n} {v:.0f} img/s" for n, v in this.items()), flush=True)
        results[str(size)] = {
            "images": next(iter(benches.values())).n if benches else 0,
            "variants": {n: {"images_per_s": speeds[n], "median": statistics.median(speeds[n]),
                             "ratio_median": statistics.median(ratios[n]) if ratios[n] else None,
                             "ratio_min": min(ratios[n]) if ratios[n] else None,
                             "ratio_max": max(ratios[n]) if ratios[n] else None,
                             "warmup_s": compile_s[n]} for n in benches},
            "errors": errors,
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(
        json.dumps({"machine": facts, "args": vars(args), "results": results}, indent=2))
    lines = [f"# Training-step speed ({facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}, "
             f"{facts['cpu_capability']}, AVX512-BF16 {facts['avx512_bf16']}, AMX {facts['amx_bf16']})", "",
             f"{args.repeats} interleaved repeats of {args.epochs} epoch(s) after {args.warmup} warm-up epoch(s); "
             "ratio = variant / current within one repeat: median (min-max).", "",
             "| size | variant | images/s (median) | ratio to current | warm-up epoch(s) s |", "|---|---|---|---|---|"]
    for size, res in results.items():
        for name, v in res["variants"].items():
            ratio = f"{v['ratio_median']:.2f} ({v['ratio_min']:.2f}-{v['ratio_max']:.2f})" if v["ratio_median"] else "-"
            lines.append(f"| {size} | {name} | {v['median']:.0f} | {ratio} | {v['warmup_s']:.1f} |")
        for name, err in res["errors"].items():
            lines.append(f"| {size} | {name} | cannot run: {err} | | |")
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nWritten to {out / 'benchmark.md'} and benchmark.json")
    return 0


def check_results(args, facts) -> int:
    """The same config trained with ``seeds`` seeds per variant, interleaved: do the metrics move beyond the noise?"""
    import numpy as np

    from cxrtrack.config import load_config
    from cxrtrack.data.dataset import DataCache
    from cxrtrack.training.run import run_experiment

    cache = DataCache()
    size = int(args.sizes.split(",")[0])
    out = Path(args.out)
    runs: dict[str, list[dict]] = {args.reference: [], args.check_results: []}
    for seed in range(42, 42 + args.seeds):
        for name in runs:
            values = {"data.image_size": size, "seed": seed, "tracking.tracker": "none",
                      "output_dir": str(out / "runs"), "run_name": f"{name}-{size}px-seed{seed}", **VARIANTS[name]}
            if args.data:
                values["data.path"] = args.data
            cfg = load_config(args.config, values=values)
            result = run_experiment(cfg, data=cache)
            row = {"seed": seed, "fit_s": result.timings["fit_s"], "epochs": len(result.fit.history),
                   **{k: v for k, v in result.fit.best_metrics.items()}, **result.test.tracked_metrics()}
            runs[name].append(row)
            print(f"{name} seed {seed}: val/loss {row['val/loss']:.4f} test/acc {row['test/acc']:.3f} "
                  f"test/loss {row['test/loss']:.4f} fit {row['fit_s']:.1f}s", flush=True)
    keys = ["val/loss", "val/acc", "val/f1_macro", "test/loss", "test/acc", "test/f1_macro", "fit_s"]
    lines = [f"# Results with and without {args.check_results} ({args.config}, {size} px, "
             f"seeds 42-{41 + args.seeds})", "",
             f"| metric | {args.reference} mean ± std | {args.check_results} mean ± std | difference of means |",
             "|---|---|---|---|"]
    stats = {}
    for key in keys:
        a = np.array([r[key] for r in runs[args.reference]])
        b = np.array([r[key] for r in runs[args.check_results]])
        sd = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0  # noqa: E731
        stats[key] = {args.reference: [float(a.mean()), sd(a)], args.check_results: [float(b.mean()), sd(b)]}
        lines.append(f"| {key} | {a.mean():.4f} ± {sd(a):.4f} | {b.mean():.4f} ± {sd(b):.4f} "
                     f"| {b.mean() - a.mean():+.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"machine": facts, "runs": runs, "stats": stats}, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from cxrtrack.cli import run_main

    run_main(main)
