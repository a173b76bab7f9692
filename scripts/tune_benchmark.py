#!/usr/bin/env python
"""Time tuning itself: per-trial overhead (trial wall time / training-loop time) and trials per minute with one
and with two worker processes, on the same equal-cost search (configs/tune/benchmark.yaml). Writes a Markdown
table to outputs/tune/benchmark.md. On a shared machine the load can change between the two searches: the
seconds per epoch (equal work in every trial) show it; compare ratios within one run."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime
from pathlib import Path

import optuna

from cxrtrack.cli import add_common_arguments, run_main, setup_logging
from cxrtrack.tuning.space import BaseConfig
from cxrtrack.tuning.study import tune


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_arguments(parser, default_config="configs/tune/quick.yaml")
    parser.add_argument("--space", default="configs/tune/benchmark.yaml")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--tracker", default="mlflow")
    parser.add_argument("--out", default="outputs/tune/benchmark.md")
    args = parser.parse_args()
    setup_logging(args.verbose)
    stamp = datetime.now().strftime("%m%d-%H%M%S")
    values = {"experiment": "cxr-tune-benchmark", **({"data.path": args.data} if args.data else {})}
    base = BaseConfig(args.config, list(args.overrides), values)
    rows = []
    for workers in (1, 2):
        start = time.perf_counter()
        result = tune(args.space, base, args.tracker, study=f"benchmark-{stamp}-w{workers}", trials=args.trials,
                      workers=workers)
        wall = time.perf_counter() - start
        trials = [t for t in optuna.load_study(study_name=result.study, storage=result.storage).get_trials()
                  if t.state.name == "COMPLETE"]
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        steady = len(trials) / ((last - first).total_seconds() / 60)
        # the machine's load shows in the time per epoch (equal work in every trial): compare it between the rows
        epoch_s = statistics.median(t.user_attrs["fit_s"] / t.user_attrs["epochs"] for t in trials)
        rows.append((workers, len(trials), wall, result.stats.get("trials_per_minute"), steady,
                     result.stats.get("overhead_median"), epoch_s))
    lines = [f"# Tuning benchmark ({datetime.now():%Y-%m-%d %H:%M}, tracker {args.tracker}, {args.trials} trials of "
             f"{args.config}, space {args.space})", "",
             "| workers | trials | session wall (s) | trials/min (session, incl. worker start-up) | trials/min "
             "(first trial start to last trial end) | per-trial overhead, median (wall / training loop) | "
             "seconds per epoch in a trial (median) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {w} | {n} | {wall:.1f} | {tpm:.2f} | {steady:.2f} | {ovh:.3f} | {ep:.2f} |"
              for w, n, wall, tpm, steady, ovh, ep in rows]
    lines += ["", f"Two workers vs one: {rows[1][3] / rows[0][3]:.2f}x trials/min per session, "
              f"{rows[1][4] / rows[0][4]:.2f}x steady-state."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run_main(main)
