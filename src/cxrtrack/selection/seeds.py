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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtrack.config import flatten
from cxrtrack.data.dataset import CXRData, DataCache
from cxrtrack.provenance import environment_tags, git_info, scrub_secrets
from cxrtrack.selection.cv import child_parents, mean_std, parent_cfg
from cxrtrack.tracking import FINISHED, KILLED, TrackerGroup, build_tracker
from cxrtrack.tracking.base import RunInfo
from cxrtrack.tracking.readback import RunRecord
from cxrtrack.training.run import claim_run_dir, make_run_name
from cxrtrack.utils import write_text_atomic

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
    name = make_run_name(cfg) if cfg.get("run_name") else f"{make_run_name(cfg)}-seeds{n}"
    name, run_dir = claim_run_dir({**cfg, "run_name": name})  # its own new folder, as every run gets
    group = group or cfg["tracking"]["group"] or name
    cache = data if isinstance(data, DataCache) else DataCache()
    tracker = tracker if tracker is not None else build_tracker(cfg["tracking"]["tracker"], parent_cfg(cfg))
    safe_cfg = scrub_secrets(cfg)
    config = {**safe_cfg, "seed_list": seeds}
    tags = {**git_info(), **environment_tags("n/a"), "config": cfg.get("config_name", ""), "model": "CustomCXRNet",
            "seeds": ",".join(map(str, seeds)), **{str(a): str(b) for a, b in safe_cfg["tracking"]["tags"].items()}}
    tags.pop("device", None)
    record = RunRecord(name=name, params=flatten(config), tags=tags)
    log.info("Seed study %s: %d seeds (%s)%s.", name, n, ", ".join(map(str, seeds)),
             f", each a {cfg['training']['cv_folds']}-fold cross-validation" if cv else "")
    runs: list[Any] = []
    status = FINISHED
    t0 = time.perf_counter()
    with tracker:
        tracker.start_run(RunInfo(name, config, tags, group=group, job_type=job_type, parents=dict(parents or {}),
                                  description=description or f"{cfg.get('config_name')} with {n} seeds: mean +- std of "
                                  f"the test metrics over the seeds (one child run per seed)."))
        nested = child_parents(tracker, parents)
        for seed in seeds:
            scfg = copy.deepcopy(cfg)
            scfg.update(seed=seed, run_name=f"{name}-seed{seed}", output_dir=str(run_dir / "seeds"))
            scfg["tracking"]["log_model"] = False
            scfg["tracking"]["tags"] = {**cfg["tracking"]["tags"], "seed_study": name, "seed": str(seed)}
            kwargs = dict(data=cache, group=group, parents=nested, description=f"Seed {seed} of seed study {name}")
            result = run_cv(scfg, job_type="cv", **kwargs) if cv else run_experiment(scfg, job_type="seed", **kwargs)
            runs.append(result)
            if result.status == KILLED:
                status = KILLED
                break
        rows, values = [], {}
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
        summary = {k: v for k, v in summary.items() if not math.isnan(v)}
        out = run_dir / "seeds_summary.json"
        write_text_atomic(out, json.dumps({"seeds": seeds, "stats": stats, "runs": rows}, indent=2, default=str))
        tracker.log_summary(summary)
        if rows:
            tracker.log_table("seeds/runs", rows)
            record.tables["seeds/runs"] = len(rows)
        tracker.log_artifact(out)
        record.summary, record.artifacts, record.status = summary, ["seeds_summary.json"], status
        tracker.end_run(status)
    record.extra = {"runs": {t.name: t.run_ref() for t in tracker.trackers}, "total_s": time.perf_counter() - t0}
    write_text_atomic(run_dir / "tracked.json", record.to_json())
    result = SeedsResult(name, run_dir, status, seeds, runs, stats, summary, record, tracker)
    for key in ("test/acc", "test/f1_macro", "test/roc_auc_ovr_macro", "oof/acc", "oof/f1_macro"):
        if key in stats:
            log.info("Seed study %s: %s", name, result.line(key))
    return result
