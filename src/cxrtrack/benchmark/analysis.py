"""From the raw measurements of a compare to the numbers its report shows: model results side by side,
overhead ratios against the no-tracker baseline, fixed costs per backend, footprint, and the targets.

Every figure here is derived from ``report["runs"]`` (what each fresh training process did and wrote in
its ``timings.json`` and ``tracked.json``) and the other phases' raw results; nothing is typed in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

RESULT_KEYS = ("test/acc", "test/f1_macro", "test/recall_covid19", "test/recall_normal", "test/recall_viral_pneumonia",
               "test/roc_auc_ovr_macro")
# tracker calls -> the cost they belong to (per backend, from timings.json "calls")
FIXED_COSTS = {
    "import": ("setup",),
    "start": ("start_run",),
    "epoch_logging": ("log_metrics",),
    "report_upload": ("log_summary", "log_image", "log_artifact", "log_predictions", "flush", "set_tags"),
    "model_export": ("log_model",),
    "finish": ("end_run",),
}
BACKENDS_OF = {"mlflow": ["mlflow"], "wandb": ["wandb"], "both": ["mlflow", "wandb"], "none": []}


def spread(values: list[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size),
            "values": [float(v) for v in arr]}


def analyse(report: dict[str, Any]) -> None:
    runs = report.get("runs", [])
    trackers = report["meta"].get("trackers", [])
    report["results"] = _results(runs, trackers)
    report["overhead"] = _overhead(runs, trackers)
    report["footprint"] = _footprint(runs, trackers, report.get("imports", {}))
    report["epoch_times"] = _epoch_times(runs, trackers)
    report["targets"] = _targets(report)


def _ok(runs, tracker):
    return [r for r in runs if r["tracker"] == tracker and r["ok"]]


def _results(runs: list[dict], trackers: list[str]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for tracker in trackers:
        ok = _ok(runs, tracker)
        failed = [r for r in runs if r["tracker"] == tracker and not r["ok"]]
        table[tracker] = {key: spread([r["summary"].get(key, float("nan")) for r in ok]) for key in RESULT_KEYS}
        table[tracker]["runs_ok"], table[tracker]["runs_failed"] = len(ok), len(failed)
        if failed:
            table[tracker]["errors"] = [r["error"] for r in failed]
    values = {key: [r["summary"].get(key) for r in runs if r["ok"] and key in r["summary"]] for key in RESULT_KEYS}
    diffs = {key: (max(v) - min(v)) if v else None for key, v in values.items()}
    identical = all(d == 0 for d in diffs.values() if d is not None)
    out = {"by_tracker": table, "max_abs_diff": diffs, "identical": identical}
    if identical:
        out["explanation"] = ("Identical in every run: same seed, same data, deterministic CPU kernels; neither "
                              "tracker touches the random number generators the training uses.")
    else:
        out["explanation"] = _divergence([r for r in runs if r["ok"]])
    return out


def _divergence(runs: list[dict]) -> str:
    """Where the training histories of the runs first differ (read from each run's tracked.json)."""
    histories = {}
    for r in runs:
        try:
            histories[r["run_name"]] = json.loads((Path(r["run_dir"]) / "tracked.json").read_text())["metrics"]
        except (OSError, ValueError, KeyError):
            continue
    if len(histories) < 2:
        return "The results differ, and too few run records were readable to say where."
    names = list(histories)
    ref = histories[names[0]]
    first = None
    for name in names[1:]:
        for key in ("train/loss", "val/loss"):
            for (step, a), (_, b) in zip(ref.get(key, []), histories[name].get(key, []), strict=False):
                if a != b and (first is None or step < first[0]):
                    first = (step, key, name, abs(a - b))
    if first is None:
        return ("The training histories are identical; the difference arises in the final evaluation "
                "(e.g. a different best epoch chosen on a tie).")
    return (f"The runs diverge during training: {first[1]} first differs at epoch {first[0]} ({first[2]} vs "
            f"{names[0]}, by {first[3]:.2e}). Floating-point reductions on multi-threaded CPU kernels are not "
            f"bitwise reproducible when other threads (a tracker's sampler or service) change the scheduling.")


def _calls(run: dict, backend: str) -> dict[str, dict[str, float]]:
    return run.get("timings", {}).get("calls", {}).get(backend, {})


def _fixed_costs(run: dict, backend: str) -> dict[str, float | None]:
    calls = _calls(run, backend)
    costs = {name: sum(calls.get(m, {}).get("total_s", 0.0) for m in methods) for name, methods in FIXED_COSTS.items()}
    n = calls.get("log_metrics", {}).get("calls", 0)
    return {**costs, "per_epoch_logging_ms": 1e3 * costs["epoch_logging"] / n if n else None}


def _overhead(runs: list[dict], trackers: list[str]) -> dict[str, Any]:
    base = {r["repeat"]: r for r in _ok(runs, "none")}
    out: dict[str, dict[str, Any]] = {}
    for tracker in trackers:
        if tracker == "none":
            continue
        ok = [r for r in _ok(runs, tracker) if r["repeat"] in base]
        if not ok:
            reason = "every run of this tracker failed" if any(r["tracker"] == tracker for r in runs) else "not run"
            if not base:
                reason = "no successful no-tracker baseline run"
            out[tracker] = {"status": "failed" if "failed" in reason else "missing", "reason": reason}
            continue
        entry: dict[str, Any] = {"status": "ok", "repeats": len(ok)}
        entry["wall_ratio"] = spread([r["wall_s"] / base[r["repeat"]]["wall_s"] for r in ok])
        entry["fit_ratio"] = spread([r["timings"]["fit_s"] / base[r["repeat"]]["timings"]["fit_s"] for r in ok])
        entry["extra_wall_s"] = spread([r["wall_s"] - base[r["repeat"]]["wall_s"] for r in ok])
        entry["phases_s"] = {k: spread([r["timings"].get(k, 0.0) for r in ok]) for k in (
            "tracker_start_s", "epoch_logging_s", "fit_s", "test_eval_s", "report_upload_s", "model_export_s",
            "tracker_end_s", "total_s")}
        entry["backends"] = {}
        for backend in BACKENDS_OF[tracker]:
            costs = [_fixed_costs(r, backend) for r in ok]
            entry["backends"][backend] = {k: spread([v for c in costs if (v := c[k]) is not None]) for k in costs[0]}
        out[tracker] = entry
    none_ok = list(base.values())
    out["none"] = {"status": "ok" if none_ok else "failed", "wall_s": spread([r["wall_s"] for r in none_ok]),
                   "fit_s": spread([r["timings"].get("fit_s") for r in none_ok if r.get("timings")])}
    return out


def _footprint(runs: list[dict], trackers: list[str], imports: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"imports": imports}
    for tracker in trackers:
        ok = _ok(runs, tracker)
        if not ok:
            out[tracker] = {"status": "failed", "reason": "no successful run"}
            continue
        parts = sorted({k for r in ok for k, v in r["store_bytes"].items() if v})
        spawned = sorted({name for r in ok for name in r["spawned"]})
        out[tracker] = {
            "status": "ok",
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in ok]),
            "peak_tree_rss_mb": spread([r["peak_tree_rss_mb"] for r in ok]),
            "spawned": {name: spread([r["spawned"].get(name, 0.0) for r in ok]) for name in spawned},
            "store_bytes": {p: spread([r["store_bytes"].get(p, 0) for r in ok]) for p in parts},
            "store_bytes_total": spread([sum(r["store_bytes"].values()) for r in ok]),
        }
    return out


def fmt_s_plain(seconds: float) -> str:
    return f"{seconds:.2f} s" if abs(seconds) >= 1 else f"{seconds * 1e3:.0f} ms"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def _epoch_times(runs: list[dict], trackers: list[str]) -> dict[str, Any]:
    """Median epoch time per epoch and tracker (from each run's tracked.json): where the overhead sits."""
    series: dict[str, list[list[float]]] = {}
    for r in runs:
        if not r["ok"]:
            continue
        try:
            points = json.loads((Path(r["run_dir"]) / "tracked.json").read_text())["metrics"]["epoch_time_s"]
        except (OSError, ValueError, KeyError):
            continue
        series.setdefault(r["tracker"], []).append([v for _, v in sorted(points)])
    out: dict[str, Any] = {}
    for tracker in trackers:
        runs_of = series.get(tracker)
        if not runs_of:
            continue
        n = min(len(s) for s in runs_of)
        out[tracker] = {"median_per_epoch_s": [float(np.median([s[i] for s in runs_of])) for i in range(n)]}
    base = out.get("none", {}).get("median_per_epoch_s")
    if base:
        for entry in out.values():
            own = entry["median_per_epoch_s"]
            n = min(len(own), len(base))
            if n:
                entry["first_epoch_ratio"] = own[0] / base[0]
                entry["later_epochs_ratio"] = (float(np.median([own[i] / base[i] for i in range(1, n)]))
                                               if n > 1 else None)
    return out


NOISY_SPREAD = 0.10  # a spread of the training-loop ratio over repeats beyond which no verdict is given


def verdict(met: bool | None) -> str:
    return "inconclusive" if met is None else "met" if met else "NOT met"


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for tracker, entry in report.get("overhead", {}).items():
        if tracker == "none" or entry.get("status") != "ok":
            continue
        med, lo, hi = (entry["fit_ratio"][k] for k in ("median", "min", "max"))
        measured = f"{(med - 1) * 100:+.1f} % (range {(lo - 1) * 100:+.1f} to {(hi - 1) * 100:+.1f} %)"
        # repeats that disagree by more than ten times the target measure the machine's load, not the tracker
        noisy = hi - lo > NOISY_SPREAD or entry["fit_ratio"]["n"] < 2
        if entry["fit_ratio"]["n"] < 2:
            measured += "; one repeat has no spread to judge it by, so no verdict: use REPEATS=3 or more"
        elif noisy:
            measured += ("; the repeats disagree too much to judge, so no verdict (a busy machine): "
                         "rerun on a quiet one, more REPEATS")
        targets.append({"target": f"training-loop overhead of {tracker} <= 1 % (median of repeats)",
                        "measured": measured, "met": None if noisy else med <= 1.01})
    for backend, result in report.get("latency", {}).items():
        ops = result.get("ops") if isinstance(result, dict) else None
        if not ops:
            continue
        worst = max(ops.items(), key=lambda kv: kv[1]["own_over_raw"])
        paired = sorted(v["layer_over_raw"] for v in ops.values())
        targets.append({"target": f"tracker layer adds <= 10 % to the raw {backend} call",
                        "measured": f"worst op {worst[0]}: layer's own {fmt_us(worst[1]['layer_own']['median_s'])} = "
                                    f"{(worst[1]['own_over_raw'] - 1) * 100:+.2f} % (paired medians, noisy: "
                                    f"{(paired[0] - 1) * 100:+.0f} .. {(paired[-1] - 1) * 100:+.0f} %)",
                        "met": worst[1]["own_over_raw"] <= 1.10})
        verify = result.get("verify_offline") or {}
        if verify.get("median_s") is not None:
            raw_finish = ops["finish"]["raw"]["median_s"]
            targets.append({"target": f"tracker layer adds <= 10 % to the raw {backend} finish, "
                                      "with the read-back check",
                            "measured": f"+{fmt_s_plain(verify['median_s'])} per run for reading the offline run back "
                                        f"(tracking.wandb.verify_offline), {verify['median_s'] / raw_finish:.0f}x "
                                        f"the raw finish; a deliberate reliability cost, once per run",
                            "met": verify["median_s"] <= 0.10 * raw_finish})
    meta = report["meta"]
    limit = 300 if meta.get("quick") else 1200
    if meta.get("wall_s") is not None and meta.get("complete", True):  # an interrupted compare has no total
        targets.append({"target": f"whole compare ({'QUICK' if meta.get('quick') else 'default'}) <= {limit // 60} min",
                        "measured": f"{meta['wall_s'] / 60:.1f} min", "met": meta["wall_s"] <= limit})
    return targets
