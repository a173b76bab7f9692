"""The same config with n seeds (``training.seeds``, ``SEEDS=`` in make): mean +- std of the test metrics.

One seed is one draw: on the real data four seeds of the default config gave test accuracies from 0.833 to
0.894. A result is quoted as the mean +- sample standard deviation over seeds ``seed, seed+1, ...``, each
of which changes the weight initialisation, the shuffling, the augmentation and the validation split (or
the folds). Each seed is a child run (a plain run, or a whole cross-validation when ``cv_folds > 1``) under
one parent run (MLflow: nested; W&B: the same group), which holds the statistics and a table of the seeds.
No model is logged or registered by a seed study: it measures a config; train the model you ship with one
seed (or cross-validate it).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtrack.data.dataset import CXRData, DataCache
from cxrtrack.selection.cv import mean_std
from cxrtrack.tracking import FINISHED, KILLED, TrackerGroup, build_tracker
from cxrtrack.tracking.readback import RunRecord
from cxrtrack.training.scaffold import child_parents, open_run, parent_cfg

log = logging.getLogger(__name__)


@dataclass
class SeedsResult:
    run_name: str
    run_dir: Path
    status: str
    seeds: list[int]
    runs: list[Any]  # RunResult or CVResult, one per seed
    stats: dict[str, dict[str, Any]]  # "test/acc" -> {"mean", "std", "values"}; also the validation metrics
    summary: dict[str, float] = field(default_factory=dict)
    record: RunRecord | None = None
    tracker: TrackerGroup | None = None

    @property
    def complete(self) -> bool:
        """Every store holds all of the parent run and of every seed's runs (see RunResult.complete)."""
        return all(r.complete for r in self.runs) and not (self.tracker is not None and self.tracker.problems())

    def line(self, key: str) -> str:
        s = self.stats[key]
        return f"{key} {s['mean']:.3f} ± {s['std']:.3f} (n={len(s['values'])})"


def _validation(run) -> dict[str, float]:
    """A seed's validation numbers: its best epoch's, or its cross-validation's fold means and pooled out-of-fold
    metrics (``oof/acc``, ``oof/recall_covid19``, ...)."""
    oof = {k.removeprefix("cv/"): v for k, v in getattr(run, "summary", {}).items() if k.startswith("cv/oof/")}
    return {**{k: v for k, v in run.fit.best_metrics.items() if k.startswith("val/")}, **oof}


def run_seeds(
    cfg: dict[str, Any],
    tracker: TrackerGroup | None = None,
    *,
    data: CXRData | DataCache | None = None,
    callbacks=(),
    group: str | None = None,
    job_type: str = "seeds",
    parents: dict[str, str] | None = None,
    description: str | None = None,
) -> SeedsResult:
    from cxrtrack.selection.cv import run_cv
    from cxrtrack.training.run import run_experiment

    n, base = cfg["training"]["seeds"], cfg["seed"]
    seeds = [base + i for i in range(n)]
    cv = cfg["training"]["cv_folds"] > 1
    cache = data if isinstance(data, DataCache) else DataCache()
    tracker = tracker if tracker is not None else build_tracker(cfg["tracking"]["tracker"], parent_cfg(cfg))
    run = open_run(cfg, {"seed_list": seeds}, device=None, tags={"seeds": ",".join(map(str, seeds))},
                   suffix=f"seeds{n}")
    name, group = run.name, group or cfg["tracking"]["group"] or run.name
    log.info("Seed study %s: %d seeds (%s)%s.", name, n, ", ".join(map(str, seeds)),
             f", each a {cfg['training']['cv_folds']}-fold cross-validation" if cv else "")
    runs: list[Any] = []
    status = FINISHED
    with tracker:
        run.start(tracker, group=group, job_type=job_type, parents=parents,
                  description=description or f"{cfg.get('config_name')} with {n} seeds: mean +- std of the test "
                  f"metrics over the seeds (one child run per seed).")
        nested = child_parents(tracker, parents)
        for seed in seeds:
            scfg = copy.deepcopy(cfg)
            scfg.update(seed=seed, run_name=f"{name}-seed{seed}", output_dir=str(run.dir / "seeds"))
            scfg["tracking"]["log_model"] = False
            scfg["tracking"]["tags"] = {**cfg["tracking"]["tags"], "seed_study": name, "seed": str(seed)}
            kwargs: dict[str, Any] = dict(data=cache, group=group, parents=nested,
                                          description=f"Seed {seed} of seed study {name}")
            member = run_cv(scfg, job_type="cv", **kwargs) if cv else run_experiment(scfg, job_type="seed", **kwargs)
            runs.append(member)
            if member.status == KILLED:
                status = KILLED
                break
        rows: list[dict[str, Any]] = []
        values: dict[str, list[float]] = {}
        for seed, r in zip(seeds, runs, strict=False):
            row = {"seed": seed, "run_name": r.run_name, "status": r.status, **_validation(r),
                   **(r.test.tracked_metrics() if r.test is not None else {})}
            rows.append(row)
            for key, value in row.items():
                if isinstance(value, float) and key.startswith(("test/", "val/", "oof/")):
                    values.setdefault(key, []).append(value)
        stats = {key: mean_std(v) for key, v in values.items()}
        summary = {"seeds/completed": float(len(runs))}
        for key, s in stats.items():
            summary[f"seeds/{key}_mean"], summary[f"seeds/{key}_std"] = s["mean"], s["std"]
        run.summary = summary = {k: v for k, v in summary.items() if not math.isnan(v)}
        run.save("seeds_summary.json",
                 json.dumps({"seeds": seeds, "stats": stats, "runs": rows}, indent=2, default=str))
        if rows:
            tracker.log_table("seeds/runs", rows)
        run.publish(tracker)
        run.end(tracker, status)
    run.write_record(tracker)
    result = SeedsResult(name, run.dir, status, seeds, runs, stats, summary, tracker.record, tracker)
    for key in ("test/acc", "test/f1_macro", "test/roc_auc_ovr_macro", "oof/acc", "oof/f1_macro"):
        if key in stats:
            log.info("Seed study %s: %s", name, result.line(key))
    return result
