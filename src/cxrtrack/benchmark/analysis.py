"""From the raw measurements of a compare to the numbers its report shows: model results side by side,
overhead ratios against the no-tracker baseline, fixed costs per backend, footprint, the machine's load, the
fixed thresholds, and the verdicts the report opens with (each computed from those numbers, with the noise
judged from the spread over the repeats).

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
    report["load"] = _load(runs)
    report["targets"] = _targets(report)
    report["verdicts"] = verdicts(report)


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
            "peak_tree_sampled_mb": spread([r["peak_tree_sampled_mb"] for r in ok if r.get("peak_tree_sampled_mb")]),
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


# -- the machine's load around each run ------------------------------------------------------------------

BUSY_PCT = 25.0  # other programs used more than a quarter of all cores just before a run
STEAL_PCT = 5.0  # the hypervisor took more than 5 % of the CPU time


def _load(runs: list[dict]) -> dict[str, Any]:
    """Load average, CPU busy and steal shares just before and just after every run (``runs.machine_load``), and
    whether the machine was busy: before a run nothing of the compare runs, so what is busy then is someone else."""
    rows, busy_runs = [], []
    for r in runs:
        before, after = r.get("load_before") or {}, r.get("load_after") or {}
        if not before and not after:
            continue
        rows.append({"run": r["run_name"], "before": before, "after": after})
        reasons = []
        if (before.get("busy_pct") or 0) > BUSY_PCT:
            reasons.append(f"{before['busy_pct']:.0f} % of the CPUs busy before it started")
        steal = max((x.get("steal_pct") or 0) for x in (before, after))
        if steal > STEAL_PCT:
            reasons.append(f"{steal:.0f} % CPU steal")
        if reasons:
            busy_runs.append(f"{r['run_name']} ({', '.join(reasons)})")
    out: dict[str, Any] = {"runs": rows, "busy": bool(busy_runs), "busy_runs": busy_runs,
                           "thresholds": {"busy_pct": BUSY_PCT, "steal_pct": STEAL_PCT}}
    if not rows:
        out["warning"] = "The machine's load was not recorded for these runs."
    elif busy_runs:
        out["warning"] = (f"The machine was busy during {len(busy_runs)} of {len(rows)} runs: "
                          + "; ".join(busy_runs) + ". Timings from a busy machine measure its load as much as the "
                          "trackers: rerun on an idle machine, with more REPEATS.")
    return out


# -- the verdicts the report opens with ------------------------------------------------------------------


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f} %"


def _secs(value: float) -> str:
    return f"{value:.2f} s" if abs(value) >= 1 else f"{value * 1e3:.1f} ms" if abs(value) >= 1e-3 else \
        f"{value * 1e6:.1f} µs"


def _mb(value: float) -> str:
    return f"{value:.1f} MB" if value < 1024 else f"{value / 1024:.2f} GB"


def _described(name: str, s: dict[str, Any], fmt) -> str:
    if s["n"] < 2:
        return f"{name} {fmt(s['median'])}"
    return f"{name} {fmt(s['median'])} ({fmt(s['min'])} .. {fmt(s['max'])})"


def rank(a: str, sa: dict[str, Any], b: str, sb: dict[str, Any], fmt, what: str = "cheaper") -> dict[str, str]:
    """Which of two spreads is lower, judged by the repeats: with fewer than two on either side the noise cannot be
    judged, so there is no ranking; when the ranges (min .. max over the repeats) overlap the difference is inside
    the noise; else the lower one is named. ``{"status": "ranked" | "noise" | "unknown", "winner", "text"}``."""
    both = f"{_described(a, sa, fmt)} vs {_described(b, sb, fmt)}"
    if sa["n"] < 2 or sb["n"] < 2:
        n = min(sa["n"], sb["n"])
        return {"status": "unknown", "winner": "", "text": f"{both}, from {n} repeat{'s' if n != 1 else ''}: the noise "
                "cannot be judged from a single measurement, so no ranking (use REPEATS=3 or more)"}
    if sa["min"] <= sb["max"] and sb["min"] <= sa["max"]:
        return {"status": "noise", "winner": "", "text": f"{both} (median, min .. max over {min(sa['n'], sb['n'])} "
                "repeats): the ranges overlap, so the difference is inside the noise"}
    winner, loser = (a, b) if sa["median"] < sb["median"] else (b, a)
    return {"status": "ranked", "winner": winner, "text": f"{winner} is {what}: {both} (median, min .. max over "
            f"{min(sa['n'], sb['n'])} repeats; the ranges do not overlap)"}


def _verdict(question: str, answer: str, basis: str, status: str = "info", section: str = "") -> dict[str, str]:
    return {"question": question, "answer": answer, "basis": basis, "status": status, "section": section}


def verdicts(report: dict[str, Any]) -> list[dict[str, str]]:
    """One short verdict per question a user decides by, each computed from the report's own numbers (never typed
    in): cost per run, cost per logged point, what survives an outage, what works offline, what the UI gives,
    code needed. Timings are ranked only when the repeats say the difference is larger than the noise."""
    out = [_cost_per_run(report), _cost_per_point(report), _outage(report), _offline(report), _ui(report),
           _code(report)]
    return [v for v in out if v is not None]


def _ranked_answer(ranked: dict[str, Any], wins: str, what: str, samples: str, single: str) -> str:
    """The one-sentence answer for a ``rank`` result: who wins, a tie within noise, or too few samples."""
    if ranked["status"] == "ranked":
        return f"{ranked['winner']} {wins}."
    if ranked["status"] == "noise":
        return f"No difference in {what} that {samples} can tell from noise."
    return f"Not ranked: {single} cannot tell a difference in {what} from noise."


def _cost_per_run(report: dict[str, Any]) -> dict[str, str]:
    q = "Cost per run"
    over, fp = report.get("overhead", {}), report.get("footprint", {})
    m, w = over.get("mlflow", {}), over.get("wandb", {})
    if m.get("status") != "ok" or w.get("status") != "ok":
        return _verdict(q, "Not measured: " + "; ".join(f"{t}: {e.get('reason', 'not run')}" for t, e in
                                                        (("mlflow", m), ("wandb", w)) if e.get("status") != "ok"),
                        "section 2", "unknown", "2. Overhead")
    time = rank("MLflow", m["extra_wall_s"], "W&B", w["extra_wall_s"], _secs)
    parts = [f"time added to a whole run: {time['text']}"]
    statuses = [time["status"]]
    b = over.get("both", {})
    if b.get("status") == "ok":
        parts.append(f"both at once: {_described('', b['extra_wall_s'], _secs).strip()}")
    fm, fw = fp.get("mlflow", {}), fp.get("wandb", {})
    if fm.get("status") == "ok" and fw.get("status") == "ok":
        # bytes are counted, not timed: compared directly (medians), no noise to judge
        dm, dw = fm["store_bytes_total"]["median"] / 2**20, fw["store_bytes_total"]["median"] / 2**20
        disk = (f"MLflow {_mb(dm)} vs W&B {_mb(dw)}" + ("" if max(dm, dw) <= 1.1 * min(dm, dw) else
                f", {'MLflow' if dm < dw else 'W&B'} writes less (counted, not timed)"))
        mem = rank("MLflow", fm["peak_tree_rss_mb"], "W&B", fw["peak_tree_rss_mb"], _mb, "lighter")
        parts += [f"disk per run: {disk}", f"peak memory with its processes: {mem['text']}"]
    answer = _ranked_answer(time, "adds less time to a run", "time per run", "the repeats", "one repeat")
    if report.get("load", {}).get("busy"):
        answer += " The machine was busy (see Machine load): timings are unreliable."
    return _verdict(q, answer, "; ".join(parts) + ".", statuses[0], "2. Overhead, 6. Footprint")


def _cost_per_point(report: dict[str, Any]) -> dict[str, str] | None:
    q = "Cost per logged point"
    points = report.get("scaling", {}).get("points", {})
    per = {}
    for backend in ("mlflow-sqlite", "mlflow-server", "wandb-offline"):
        rows = (points.get(backend) or {}).get("results") if isinstance(points.get(backend), dict) else None
        if rows:
            per[backend] = rows
    if "wandb-offline" not in per or not ({"mlflow-sqlite", "mlflow-server"} & set(per)):
        return _verdict(q, "Not measured (see section 4).", "section 4", "unknown", "4. Cost vs work")
    mlflow_key = "mlflow-sqlite" if "mlflow-sqlite" in per else "mlflow-server"
    largest = {b: max(rows, key=lambda r: r["points"]) for b, rows in per.items()}

    def times(rows):  # seconds per point at each size: one run per size, so the sizes are the samples
        return spread([r["log_s"] / r["points"] for r in rows if r["points"]])

    t = rank(mlflow_key, times(per[mlflow_key]), "wandb-offline", times(per["wandb-offline"]), _secs)
    t["text"] = t["text"].replace("repeats", "sizes (one run each)").replace(
        "from a single measurement", "from a single size")
    bytes_pp = {b: r["bytes"] / r["points"] for b, r in largest.items() if r["points"]}
    read_pp = {b: r["read_s"] / r["points"] for b, r in largest.items() if r["points"]}
    n = largest["wandb-offline"]["points"]
    sizes = ", ".join(f"{r['points']:,}" for r in per["wandb-offline"])
    basis = (f"time to log and close, per point, over the sizes {sizes}: "
             f"{t['text']}; at {n:,} points, bytes on disk per point: "
             + ", ".join(f"{b} {v:.0f} B" for b, v in bytes_pp.items())
             + "; read back per point: " + ", ".join(f"{b} {_secs(v)}" for b, v in read_pp.items()) + ".")
    answer = _ranked_answer(t, "logs a point faster", "time per point", "the measurements", "a single size")
    small = min(bytes_pp, key=lambda b: bytes_pp[b])
    big = max(bytes_pp, key=lambda b: bytes_pp[b])
    if bytes_pp[big] > 1.5 * bytes_pp[small]:  # bytes are counted, not timed: no noise to judge
        answer += f" {small} stores a point in {bytes_pp[big] / bytes_pp[small]:.1f}x fewer bytes than {big}."
    return _verdict(q, answer, basis, t["status"], "4. Cost vs work")


def _capability(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in report.get("capabilities", []) if c.get("capability") == name), None)


def _outage(report: dict[str, Any]) -> dict[str, str]:
    q = "What survives an outage"
    row = _capability(report, "Offline run that syncs later")
    lost: dict[str, list[int]] = {}  # backend -> [runs read back, items lost]
    for backends in report.get("fidelity", {}).values():
        for backend, f in backends.items():
            runs_lost = lost.setdefault(backend, [0, 0])
            runs_lost[0] += 1
            runs_lost[1] += f["lost"] if f.get("status") == "ok" else 1
    kept = "; ".join(f"{b}: {v[1]} items lost in {v[0]} run(s) read back" for b, v in lost.items()) or \
        "no run was read back"
    if row is None:
        return _verdict(q, "Not observed in this compare (see section 7).", kept + ".", "unknown", "7. Capabilities")
    m, w = row["mlflow"], row["wandb"]
    if w["status"] in ("yes", "not measurable offline") and m["status"] == "no":
        answer = ("W&B writes the run locally and uploads it later; an MLflow run needs its store reachable "
                  "when it starts.")
    elif w["status"] == m["status"]:
        answer = f"Both answered '{m['status']}' to running without the store."
    else:
        answer = f"MLflow: {m['status']}; W&B: {w['status']}, running without the store."
    return _verdict(q, answer, f"MLflow: {m['evidence']}. W&B: {w['evidence']}. Read back after the runs: {kept}.",
                    "info", "5. Fidelity, 7. Capabilities")


def _offline(report: dict[str, Any]) -> dict[str, str]:
    q = "What works offline"
    caps = report.get("capabilities", [])
    if not caps:
        return _verdict(q, "Not observed in this compare (see section 7).", "section 7", "unknown", "7. Capabilities")
    counts = {b: sum(c[b]["status"] == "yes" for c in caps) for b in ("mlflow", "wandb")}
    needs = {b: [c["capability"] for c in caps if c[b]["status"] == "not measurable offline"]
             for b in ("mlflow", "wandb")}
    answer = (f"With no network, MLflow did {counts['mlflow']} of {len(caps)} observed capabilities on a local store, "
              f"W&B {counts['wandb']} of {len(caps)}.")
    basis = "; ".join(f"{'MLflow' if b == 'mlflow' else 'W&B'} needs its server for: {', '.join(v)}"
                      for b, v in needs.items() if v) or "nothing needed a server"
    return _verdict(q, answer, basis + " (each a check made here, section 7).", "info", "7. Capabilities")


def _ui(report: dict[str, Any]) -> dict[str, str]:
    q = "What the UI gives"
    row = _capability(report, "Local UI")
    if row is None:
        return _verdict(q, "Not observed in this compare (see section 7).", "section 7", "unknown", "7. Capabilities")
    m, w = row["mlflow"], row["wandb"]
    answer = ("MLflow: a local web UI (`mlflow ui` / `mlflow server`)" if m["status"] == "yes" else
              f"MLflow: no local UI observed ({m['status']})") + "; " + (
        "W&B: a terminal UI offline (`wandb leet`), the web app needs the W&B server" if w["status"] == "yes" else
        f"W&B: {w['status']}") + "."
    return _verdict(q, answer, f"MLflow: {m['evidence']}. W&B: {w['evidence']}.", "info", "7. Capabilities")


def _code(report: dict[str, Any]) -> dict[str, str]:
    q = "Code needed"
    eff = report.get("effort", {})
    if "mlflow" not in eff or "wandb" not in eff:
        return _verdict(q, "Not counted (see section 8).", "section 8", "unknown", "8. Integration effort")
    m, w = eff["mlflow"], eff["wandb"]
    lines = {"MLflow": m["code_lines"], "W&B": w["code_lines"]}
    fewer, more = sorted(lines, key=lambda name: lines[name])
    # counted from the code, not timed: no noise, but a difference under a tenth is called even
    if lines[more] <= 1.1 * lines[fewer]:
        answer = f"About the same code: MLflow {lines['MLflow']} lines, W&B {lines['W&B']}."
    else:
        answer = f"{fewer} needed less code here: {lines[fewer]} lines against {lines[more]}."
    basis = (f"this project's backends: MLflow {m['code_lines']} code lines, "
             f"{m['n_client_calls']} distinct client calls, "
             f"{len(m['workarounds'])} workaround(s); W&B {w['code_lines']} lines, {w['n_client_calls']} calls, "
             f"{len(w['workarounds'])} workaround(s).")
    return _verdict(q, answer, basis, "info", "8. Integration effort")
