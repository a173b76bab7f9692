"""Measure how MLflow and W&B differ when they track the same training: `make compare [QUICK=1]`
(`cxrtrack compare`).

Runs the same experiment with no tracker, MLflow, W&B and both (interleaved, fresh processes), measures
overhead, per-call latency, scaling, fidelity, footprint, capabilities and integration effort, and writes
reports/comparison/<timestamp>/report.{html,md,json} with plots. See docs/comparison.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cxrtrack.cli import EXIT_INTERRUPTED, setup_logging
from cxrtrack.errors import ConfigError


def project_root() -> Path:
    """The checkout whose ``scripts/train.py`` the comparison starts in fresh processes (and clones for the fresh-clone
    timing): the one this package was installed from (editable), else the current folder."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / "scripts" / "train.py").is_file():
            return root
    raise ConfigError(f"`cxrtrack compare` measures the training processes of a project checkout, and neither this "
                      f"package's folder nor {Path.cwd()} is one (no scripts/train.py). Run it from the project folder "
                      f"(the one holding scripts/ and configs/), e.g. `make compare`.")


def scale_plan(args: argparse.Namespace):
    from cxrtrack.benchmark.team_scale import ScalePlan

    try:
        levels = tuple(int(x) for x in args.scale_levels.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--scale-levels {args.scale_levels!r}: give writer counts, e.g. 1,4,16,64.") from None
    if not levels or min(levels) < 1 or args.scale_budget <= 0 or args.scale_epochs < 1:
        raise ConfigError("--scale-levels needs counts >= 1, --scale-budget seconds > 0, --scale-epochs >= 1.")
    return ScalePlan(levels=levels, budget_s=args.scale_budget, epochs=args.scale_epochs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training config to compare on (default: configs/quick.yaml)")
    parser.add_argument("--data", help="dataset folder (default: the training targets' default)")
    parser.add_argument("--repeats", type=int, help="runs per tracker (default 3; 1 with --quick)")
    parser.add_argument("--trackers", help="comma list of none,mlflow,wandb,both (default: all; none is always run)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast look: one repeat, smaller latency and scaling work")
    parser.add_argument("--out", help="report root (default: reports/comparison)")
    parser.add_argument("--mlflow-uri", help="use this MLflow store instead of a private one under the report folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every training run, e.g. --set training.epochs=5")
    parser.add_argument("--no-fresh-clone", action="store_true", help="skip timing a fresh clone's first runs")
    parser.add_argument("--no-log-report", action="store_true", help="do not log the report into the measured runs")
    parser.add_argument("--scale", action="store_true",
                        help="add the team-scale tier: 1, 4, 16, 64 concurrent writers on an mlflow server on "
                             "PostgreSQL, on one SQLite file and on W&B offline (docs/comparison.md)")
    parser.add_argument("--scale-levels", default="1,4,16,64", help="writer counts of the scale tier (comma list)")
    parser.add_argument("--scale-budget", type=float, default=900.0,
                        help="seconds per store for the scale tier: a level projected past it is not run (default 900)")
    parser.add_argument("--scale-epochs", type=int, default=50, help="epochs per writer in the scale tier (default 50)")
    parser.add_argument("--only", metavar="PHASES",
                        help="run only these phases (comma list of runs, fidelity, imports, server, latency, scaling, "
                             "capabilities, effort, scale), e.g. --only scale")
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("cxrtrack.benchmark").setLevel(logging.INFO)

    from cxrtrack.benchmark.compare import Compare, ComparePlan
    from cxrtrack.benchmark.report import terminal_summary

    extra: dict[str, Any] = {"out_root": Path(args.out).resolve()} if args.out else {}
    if args.no_fresh_clone:
        extra["fresh_clone"] = False
    plan = ComparePlan.make(project_root(), args.config, args.repeats, args.trackers, args.quick, data=args.data,
                            mlflow_uri=args.mlflow_uri, extra_sets=args.overrides,
                            log_report=not args.no_log_report, scale=args.scale, only=args.only,
                            scale_plan=scale_plan(args), **extra)
    compare = Compare(plan)
    report = compare.run()
    print(terminal_summary(report))
    print(f"\nReport: {compare.dir / 'report.html'} (open it in a browser); also report.md, report.json and plots.")
    return 0 if report["meta"]["complete"] else EXIT_INTERRUPTED
