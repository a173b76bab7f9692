"""Write a compare's report: ``report.json`` (every raw figure), PNG plots, ``report.md``, a self-contained
``report.html`` (plots embedded, no server, no external assets) and a summary for the terminal."""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cxrtrack.benchmark import team_scale
from cxrtrack.benchmark.analysis import verdict
from cxrtrack.benchmark.latency import OPS

PLOTS = {
    "overhead.png": "Whole run and training loop, relative to no tracker (median, bars: min-max over repeats)",
    "fixed_costs.png": "Where each backend spends its time in a run (median seconds)",
    "latency.png": "Per-call latency (median; whiskers to p95) through our layer, with the raw client's median",
    "scaling.png": "Cost as the work grows (log axes)",
    "curves.png": "Training curves read back from both stores, overlaid",
    "storage.png": "Bytes on disk per run, by store (median)",
    "epoch_times.png": "Epoch time with each tracker (median over repeats): a start-up burst or a steady cost?",
}
COLORS = {"none": "#888888", "mlflow": "#0194e2", "wandb": "#f5a623", "both": "#6c4ab6",
          "mlflow-sqlite": "#0194e2", "mlflow-sqlite-async": "#65c7f7", "mlflow-server": "#01577f",
          "wandb-offline": "#f5a623", "wandb-online": "#b36b00"}


def fmt_s(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) < 1e-3:  # (a tracked run can be faster than none: negative extra seconds)
        return f"{value * 1e6:.0f} µs"
    if abs(value) < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{(ratio - 1) * 100:+.1f} %"


# -- plots ----------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overhead(report: dict, path: Path) -> bool:
    rows = [(t, e) for t, e in report.get("overhead", {}).items() if t != "none" and e.get("status") == "ok"]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    for offset, key, label, hatch in ((-0.2, "wall_ratio", "whole run", ""), (0.2, "fit_ratio", "training loop", "//")):
        med = [e[key]["median"] for _, e in rows]
        err = [[m - e[key]["min"] for m, (_, e) in zip(med, rows, strict=True)],
               [e[key]["max"] - m for m, (_, e) in zip(med, rows, strict=True)]]
        ax.bar(x + offset, med, 0.38, yerr=err, capsize=4, label=label, hatch=hatch,
               color=[COLORS.get(t, "grey") for t, _ in rows], edgecolor="black", alpha=0.85)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(1.01, color="red", linestyle="--", linewidth=1, label="+1 % threshold (training loop)")
    ax.set_xticks(x, [t for t, _ in rows])
    ax.set_ylabel("time / time with no tracker")
    lows = [e[k]["min"] for _, e in rows for k in ("wall_ratio", "fit_ratio")]
    highs = [e[k]["max"] for _, e in rows for k in ("wall_ratio", "fit_ratio")]
    ax.set_ylim(min(0.95, min(lows) - 0.02), max(highs) + 0.05)
    ax.legend(fontsize=8)
    ax.set_title("Overhead against the no-tracker baseline")
    _save(fig, path)
    return True


def plot_fixed_costs(report: dict, path: Path) -> bool:
    bars = []
    for tracker, entry in report.get("overhead", {}).items():
        for backend, costs in (entry.get("backends") or {}).items():
            bars.append((f"{backend} ({tracker})" if tracker == "both" else backend, costs))
    if not bars:
        return False
    parts = ["import", "start", "epoch_logging", "report_upload", "model_export", "finish"]
    colors = plt.cm.tab10(np.arange(len(parts)))
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(bars) + 2.0))
    left = np.zeros(len(bars))
    for part, color in zip(parts, colors, strict=True):
        values = np.array([(c.get(part) or {}).get("median") or 0.0 for _, c in bars])
        ax.barh(np.arange(len(bars)), values, left=left, color=color, label=part.replace("_", " "))
        left += values
    ax.set_yticks(np.arange(len(bars)), [name for name, _ in bars])
    ax.set_xlabel("seconds per run (median)")
    # below the axes: inside, it hid the end of the longest bar
    ax.legend(fontsize=8, ncols=len(parts), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.set_title("Tracker costs in one run, by kind of call")
    _save(fig, path)
    return True


def plot_latency(report: dict, path: Path) -> bool:
    backends = [(b, r) for b, r in report.get("latency", {}).items() if isinstance(r, dict) and r.get("ops")]
    if not backends:
        return False
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(backends)
    x = np.arange(len(OPS))
    for i, (backend, result) in enumerate(backends):
        layer = np.array([result["ops"][op]["layer"]["median_s"] for op in OPS])
        p95 = np.array([result["ops"][op]["layer"]["p95_s"] for op in OPS])
        raw = np.array([result["ops"][op]["raw"]["median_s"] for op in OPS])
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, layer, width, yerr=[np.zeros_like(p95), p95 - layer], capsize=2, label=backend,
               color=COLORS.get(backend, None), edgecolor="black", linewidth=0.5)
        ax.scatter(pos, raw, marker="_", s=120, color="black", zorder=3,
                   label="raw client (median)" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(x, [op.replace("_", "\n") for op in OPS])
    ax.set_ylabel("seconds per call (log)")
    ax.legend(fontsize=8, ncols=3)
    ax.set_title("Per-call latency: our tracker layer (bars) and the raw client (black ticks)")
    _save(fig, path)
    return True


def plot_scaling(report: dict, path: Path) -> bool:
    scaling = report.get("scaling", {})
    points = {b: r["results"] for b, r in scaling.get("points", {}).items() if isinstance(r, dict) and r.get("results")}
    runs = {b: r["results"] for b, r in scaling.get("runs", {}).items() if isinstance(r, dict) and r.get("results")}
    if not points and not runs:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for backend, rows in points.items():
        n = [r["points"] for r in rows]
        axes[0].plot(n, [r["log_s"] for r in rows], "-o", label=f"{backend}: log", color=COLORS.get(backend))
        axes[0].plot(n, [r["read_s"] for r in rows], "--s", label=f"{backend}: read back", color=COLORS.get(backend))
        axes[1].plot(n, [max(r["bytes"], 1) for r in rows], "-o", label=backend, color=COLORS.get(backend))
    for backend, rows in runs.items():
        n = [r["runs"] for r in rows]
        axes[2].plot(n, [r["list_s"] for r in rows], "-o", label=f"{backend}: list all", color=COLORS.get(backend))
        axes[2].plot(n, [r["search_s"] for r in rows], "--s", label=f"{backend}: filtered search",
                     color=COLORS.get(backend))
    titles = ("metric points in one run -> seconds", "metric points -> bytes on disk", "runs in the store -> seconds")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", title=title)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_curves(report: dict, path: Path) -> bool:
    curves = report.get("curves", {})
    if not curves:
        return False
    keys = ("train/loss", "val/loss", "val/acc")
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.8))
    for ax, key in zip(axes, keys, strict=True):
        for (label, series), style in zip(curves.items(), ("-o", "--x", ":s", "-.^"), strict=False):
            points = series.get(key, [])
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label, markersize=4,
                    color=COLORS.get(label.split()[0]))
        ax.set(title=key, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The same training, as each store holds it (read back, not the trainer's copy)")
    _save(fig, path)
    return True


def plot_storage(report: dict, path: Path) -> bool:
    rows = [(t, e) for t, e in report.get("footprint", {}).items() if isinstance(e, dict) and e.get("status") == "ok"
            and t != "none" and e.get("store_bytes")]
    if not rows:
        return False
    parts = sorted({p for _, e in rows for p in e["store_bytes"]})
    fig, ax = plt.subplots(figsize=(8, 3.8))
    left = np.zeros(len(rows))
    for part, color in zip(parts, plt.cm.Set2(np.arange(len(parts))), strict=True):
        values = np.array([(e["store_bytes"].get(part) or {}).get("median") or 0 for _, e in rows]) / 2**20
        ax.barh(np.arange(len(rows)), values, left=left, label=part, color=color)
        left += values
    ax.set_yticks(np.arange(len(rows)), [t for t, _ in rows])
    ax.set_xlabel("MB written per run (median)")
    ax.legend(fontsize=8)
    ax.set_title("Footprint on disk of one tracked run")
    _save(fig, path)
    return True


def plot_epoch_times(report: dict, path: Path) -> bool:
    epochs = report.get("epoch_times", {})
    if not epochs:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for tracker, entry in epochs.items():
        values = entry["median_per_epoch_s"]
        ax.plot(range(1, len(values) + 1), values, "-o", markersize=3, label=tracker, color=COLORS.get(tracker))
    ax.set(xlabel="epoch", ylabel="seconds (median over repeats)", title="Epoch time with each tracker")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


PLOTTERS = {"overhead.png": plot_overhead, "fixed_costs.png": plot_fixed_costs, "latency.png": plot_latency,
            "scaling.png": plot_scaling, "curves.png": plot_curves, "storage.png": plot_storage,
            "epoch_times.png": plot_epoch_times}


# -- tables: one list of sections, rendered to Markdown and to HTML ------------------------------------


def sections(report: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) for every table of the report."""
    out = []
    meta = report["meta"]
    results = report.get("results", {})
    keys = ["test/acc", "test/f1_macro", "test/recall_covid19", "test/recall_normal", "test/recall_viral_pneumonia",
            "test/roc_auc_ovr_macro"]
    rows = []
    for tracker, entry in results.get("by_tracker", {}).items():
        rows.append([tracker, f"{entry['runs_ok']} ok / {entry['runs_failed']} failed",
                     *[("n/a" if entry[k]["median"] is None else f"{entry[k]['median']:.4f}") for k in keys]])
    diff = results.get("max_abs_diff", {})
    out.append(("1. Model results", results.get("explanation", "") + " Largest difference between runs: "
                + ", ".join(f"{k.split('/')[1]} {v:.2g}" for k, v in diff.items() if v is not None) + ".",
                ["tracker", "runs", *[k.split("/", 1)[1] for k in keys]], rows))
    rows = []
    for tracker, e in report.get("overhead", {}).items():
        if tracker == "none":
            continue
        if e.get("status") != "ok":
            rows.append([tracker, e.get("status", "?"), e.get("reason", ""), "", "", ""])
            continue
        rows.append([tracker, f"{e['repeats']}",
                     f"{pct(e['wall_ratio']['median'])} ({pct(e['wall_ratio']['min'])} .. "
                     f"{pct(e['wall_ratio']['max'])})",
                     f"{pct(e['fit_ratio']['median'])} ({pct(e['fit_ratio']['min'])} .. "
                     f"{pct(e['fit_ratio']['max'])})", fmt_s(e["extra_wall_s"]["median"]),
                     fmt_s(e["phases_s"]["epoch_logging_s"]["median"])])
    base = report.get("overhead", {}).get("none", {})
    epochs = report.get("epoch_times", {})
    where = "; ".join(f"{t}: first epoch {pct(e.get('first_epoch_ratio'))}, "
                      f"later epochs {pct(e.get('later_epochs_ratio'))}"
                      for t, e in epochs.items() if t != "none" and "first_epoch_ratio" in e)
    note = (f"Where the training-loop overhead sits (epoch time against no tracker, median): {where or 'n/a'}. "
            "Against the same repeat with no tracker "
            f"(median {fmt_s((base.get('wall_s') or {}).get('median'))} whole run, "
            f"{fmt_s((base.get('fit_s') or {}).get('median'))} training loop). Ranges are min .. max over repeats.")
    out.append(("2. Overhead", note, ["tracker", "repeats", "whole run", "training loop", "extra seconds",
                                      "epoch logging (total)"], rows))
    rows = []
    for tracker, e in report.get("overhead", {}).items():
        for backend, c in (e.get("backends") or {}).items():
            rows.append([backend if tracker != "both" else f"{backend} (in both)",
                         *[fmt_s((c.get(k) or {}).get("median")) for k in
                           ("import", "start", "epoch_logging", "report_upload", "model_export", "finish")],
                         "n/a" if not (c.get("per_epoch_logging_ms") or {}).get("median") else
                         f"{c['per_epoch_logging_ms']['median']:.1f} ms"])
    out.append(("2b. Fixed costs per backend", "Median seconds per run, measured inside the training process per call.",
                ["backend", "import", "start", "epoch logging", "report upload", "model export", "finish",
                 "per epoch"], rows))
    rows = []
    for backend, r in report.get("latency", {}).items():
        if not isinstance(r, dict) or not r.get("ops"):
            rows.append([backend,
                         *(["skipped: " + r["skipped"]] if "skipped" in r else ["FAILED: " + str(r.get("failed"))]),
                         *[""] * (len(OPS) - 1)])
            continue
        rows.append([backend, *[f"{fmt_s(r['ops'][op]['layer']['median_s'])} / {fmt_s(r['ops'][op]['raw']['median_s'])}"
                                f" (p95 {fmt_s(r['ops'][op]['layer']['p95_s'])}; "
                                f"own {fmt_s(r['ops'][op]['layer_own']['median_s'])})"
                                for op in OPS]])
    out.append(("3. Per-call latency", "Median through our layer / median of the raw client call (p95 of the layer; "
                "own: the layer's own time, measured with the client stubbed out over thousands of calls). "
                + "".join(f"The W&B layer's finish includes reading the offline run back ({b}: "
                          f"{fmt_s(r['verify_offline']['median_s'])}), a check that W&B stored the run's end. "
                          for b, r in report.get("latency", {}).items()
                          if isinstance(r, dict) and (r.get("verify_offline") or {}).get("median_s"))
                + "Cold first start per process, left out of these medians: " + ", ".join(
                    f"{b} {fmt_s(r['cold_start_s'])}" for b, r in report.get("latency", {}).items()
                    if isinstance(r, dict) and "cold_start_s" in r) + ".", ["backend", *OPS], rows))
    rows = []
    for backend, r in report.get("scaling", {}).get("points", {}).items():
        if isinstance(r, dict) and r.get("results"):
            for x in r["results"]:
                rows.append([backend, f"{x['points']:,} points", fmt_s(x["log_s"]), f"{x['calls']:,} calls",
                             fmt_bytes(x["bytes"]), fmt_s(x["read_s"]), f"{x['read_points']:,}"])
        else:
            rows.append([backend, "", *(["skipped: " + r.get("skipped", "")] if "skipped" in r else
                                        ["FAILED: " + str(r.get("failed"))]), "", "", "", ""])
    out.append(("4. Cost vs work: metric points", "One run logs N points (10 keys x N/10 steps), batched as the client "
                "allows; then every point is read back.", ["backend", "work", "log + close", "client calls",
                                                            "bytes on disk", "read back", "points read"], rows))
    rows = []
    for backend, r in report.get("scaling", {}).get("runs", {}).items():
        if isinstance(r, dict) and r.get("results"):
            for x in r["results"]:
                rows.append([backend, f"{x['runs']:,} runs", fmt_s(x["list_s"]), fmt_s(x["search_s"]),
                             f"{x['found']:,} found"])
        else:
            rows.append([backend, "", "skipped: " + r.get("skipped", "") if "skipped" in r else
                         "FAILED: " + str(r.get("failed")), "", ""])
    out.append(("4b. Cost vs work: runs in a store", "List every run, and a filtered, ordered search "
                "(metrics.m0 > 0.5 ORDER BY metrics.m1 DESC).", ["backend", "store size", "list all",
                                                                 "filtered search", "result"], rows))
    rows = []
    lost_total = 0
    for run, backends in report.get("fidelity", {}).items():
        for backend, f in backends.items():
            if f.get("status") != "ok":
                rows.append([run, backend, "FAILED: " + f.get("error", ""), "", "", ""])
                continue
            lost_total += f["lost"]
            s = f["sections"]
            rows.append([run, backend, str(f["lost"]),
                         f"{s['metric_points']['found']}/{s['metric_points']['logged']}",
                         f"{s['params']['found']}/{s['params']['logged']}",
                         ", ".join(f"{k} {v['found']}/{v['logged']}" for k, v in s.items()
                                   if k not in ("metric_points", "params"))
                         + ("; missing: " + ", ".join(m for v in s.values() for m in v["missing"])[:200]
                            if f["lost"] else "")])
    out.append(("5. Fidelity", f"Read back from each store and diffed with what the trainer sent: {lost_total} items "
                "lost in all.", ["run", "store", "lost", "metric points", "params", "other sections (found/logged)"],
                rows))
    rows = []
    fp = report.get("footprint", {})
    for tracker, e in fp.items():
        if tracker == "imports" or not isinstance(e, dict):
            continue
        if e.get("status") != "ok":
            rows.append([tracker, "FAILED", e.get("reason", ""), "", ""])
            continue
        rows.append([tracker, fmt_bytes(e["store_bytes_total"]["median"]),
                     f"{e['peak_rss_mb']['median']:.0f} MB", f"{e['peak_tree_rss_mb']['median']:.0f} MB",
                     ", ".join(f"{n} ({v['median']:.0f} MB)" for n, v in e["spawned"].items()) or "none"])
    imports = fp.get("imports", {})
    out.append(("6. Footprint", "Peak RSS is the kernel's high-water mark of each process (VmHWM). 'With its "
                "processes' adds the peak of every process the run kept running (W&B's service) to the training "
                "process's own: an upper bound of the memory the run needed at once, never below the process's own "
                "peak (report.json also keeps the sampled sum at one instant, every 0.2 s, a lower bound). "
                "Import time in a fresh interpreter that already imported the training stack: "
                + ", ".join(f"{k} {fmt_s(v['median_s'])}" for k, v in imports.items()) + ".",
                ["tracker", "disk per run", "peak RSS (training process)", "peak RSS (with its processes)",
                 "extra processes"], rows))
    rows = [[c["capability"], f"{c['mlflow']['status']}: {c['mlflow']['evidence']}",
             f"{c['wandb']['status']}: {c['wandb']['evidence']}"] for c in report.get("capabilities", [])]
    out.append(("7. Capabilities, observed", "Each cell is a check made in this compare, with its evidence.",
                ["capability", "MLflow", "W&B"], rows))
    eff = report.get("effort", {})
    rows = []
    for backend in ("mlflow", "wandb"):
        if backend in eff:
            e = eff[backend]
            rows.append([backend, str(e["code_lines"]), f"{e['n_client_calls']}: " + ", ".join(e["client_calls"]),
                         f"{len(e['workarounds'])}: "
                         + "; ".join(f"{w['text']} ({w['file']}:{w['line']})" for w in e["workarounds"])
                         if e["workarounds"] else "none tagged"])
    first = eff.get("first_run", {})
    note = "Counted from src/cxrtrack/tracking/ (code lines exclude comments and docstrings). First tracked run: " + \
        ", ".join(f"{k} {fmt_s(v['seconds'])} ({v.get('command', v.get('how', ''))})" for k, v in first.items()
                  if isinstance(v, dict) and "seconds" in v)
    if "clone_s" in first:
        note += f"; git clone {fmt_s(first['clone_s'])}; {first.get('install', '')}"
    out.append(("8. Integration effort", note + ".", ["backend", "code lines", "distinct client calls",
                                                      "workarounds (from `# workaround(...)` comments)"], rows))
    out.append(("9. Fixed thresholds", "Each tracker against a fixed threshold: a training-loop overhead a user "
                "would not notice (1 %), and a thin tracker layer over the raw client (10 %). Inconclusive when the "
                "repeats cannot tell the difference from noise.", ["threshold", "measured", "result"],
                [[t["target"], t["measured"], verdict(t["met"])] for t in report.get("targets", [])]))
    load = report.get("load", {})
    rows = [[r["run"], *[_load_cell(r[when]) for when in ("before", "after")]] for r in load.get("runs", [])]
    out.append(("10. Machine load", (load.get("warning") or "The machine was idle enough around every run: no run "
                f"started with more than {load.get('thresholds', {}).get('busy_pct', 25):.0f} % of the CPUs busy "
                f"or more than {load.get('thresholds', {}).get('steal_pct', 5):.0f} % CPU steal.")
                + " Load average (1 and 5 min), and over half a second the share of all CPUs busy (before a run: "
                "other programs) and stolen by the hypervisor, just before and just after each run.",
                ["run", "before", "after"], rows))
    out += team_scale.report_sections(report)
    rows = [[name, p["status"], fmt_s(p.get("seconds")), p.get("error", "")]
            for name, p in report.get("phases", {}).items()]
    disk = meta.get("disk") or {}
    kept = (f" Kept on disk: {fmt_bytes(disk['kept_bytes'])} before the report files ("
            + ", ".join(f"{k}/ {fmt_bytes(v)}" for k, v in disk.get("kept_by_part", {}).items()) + "); removed: "
            + (", ".join(f"{k} {fmt_bytes(v)}" for k, v in disk.get("removed_bytes", {}).items()) or "nothing")
            + ".") if "kept_bytes" in disk else ""
    state = "complete" if meta.get("complete") else f"INCOMPLETE: {meta.get('incomplete_reason')}"
    out.append(("Phases", f"{state}." + kept,
                ["phase", "status", "time", "error"], rows))
    return out


def _load_cell(x: dict[str, Any]) -> str:
    if not x:
        return "n/a"
    num = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    return (f"load {num(x.get('load1'), '.2f')} / {num(x.get('load5'), '.2f')}, "
            f"busy {num(x.get('busy_pct'), '.0f')} %, "
            f"steal {num(x.get('steal_pct'), '.1f')} %")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def headline(report: dict) -> str:
    meta = report["meta"]
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    return (f"{meta.get('started', '')} on {m.get('cores')} x {m.get('cpu')}, {m.get('ram_gb')} GB RAM, "
            f"{m.get('platform')}; Python {m.get('python')}, torch {v.get('torch')}, mlflow {v.get('mlflow')}, "
            f"wandb {v.get('wandb')}. Config {Path(meta.get('config_file', '')).name}, {meta.get('repeats')} repeat(s) "
            f"of {', '.join(meta.get('trackers', []))}, interleaved; compare took {fmt_s(meta.get('wall_s'))}.")


TAKEAWAY_NOTE = ("Each answer below is computed from this report's own numbers (the section it cites). A timing "
                 "names a winner only when the ranges over the repeats do not overlap; with one repeat the noise "
                 "cannot be judged, so nothing is ranked.")


def busy_warning(report: dict) -> str | None:
    """'Busy machine: ...' when the machine was busy around a run, or 'Machine load not recorded: ...'."""
    load = report.get("load") or {}
    if load.get("busy"):
        return "Busy machine: " + load["warning"]
    if not load.get("runs") and report.get("runs"):
        return "Machine load not recorded: whether the machine was busy cannot be told for these runs."
    return None


def write_markdown(report: dict, folder: Path, plots: list[str]) -> str:
    meta = report["meta"]
    parts = [f"# MLflow vs W&B: measured comparison{'' if meta.get('complete') else ' (INCOMPLETE)'}", "",
             headline(report), ""]
    if not meta.get("complete"):
        parts += [f"**Incomplete:** {meta.get('incomplete_reason')}.", ""]
    if warning := busy_warning(report):
        label, text = warning.split(": ", 1)
        parts += [f"**{label}:** {text}", ""]
    parts += ["## What to take away", "", TAKEAWAY_NOTE, ""]
    for v in report.get("verdicts", []):
        parts += [f"- **{v['question']}.** {v['answer']}  ", f"  _From the numbers ({v['section']}):_ {v['basis']}"]
    parts += [""]
    for title, note, header, rows in sections(report):
        parts += [f"## {title}", "", note, "", _md_table(header, rows) if rows else "_nothing measured_", ""]
    parts += ["## Plots", ""]
    for name in plots:
        parts += [f"![{PLOTS.get(name, name)}]({name})", "", f"_{PLOTS.get(name, name)}_", ""]
    text = "\n".join(parts)
    (folder / "report.md").write_text(text)
    return text


def write_html(report: dict, folder: Path, plots: list[str]) -> None:
    meta = report["meta"]
    e = html.escape

    def img(name: str, caption: str) -> str:
        data = base64.b64encode((folder / name).read_bytes()).decode()
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                f"<figcaption>{e(caption)}</figcaption></figure>")

    body = [f"<h1>MLflow vs W&amp;B: measured comparison{'' if meta.get('complete') else ' (INCOMPLETE)'}</h1>",
            f"<p class='meta'>{e(headline(report))}</p>"]
    if not meta.get("complete"):
        body.append(f"<p class='warn'>Incomplete: {e(str(meta.get('incomplete_reason')))}</p>")
    if warning := busy_warning(report):
        body.append(f"<p class='warn'>{e(warning)}</p>")
    body.append(f"<h2>What to take away</h2><p>{e(TAKEAWAY_NOTE)}</p><dl class='verdicts'>")
    for v in report.get("verdicts", []):
        body.append(f"<dt>{e(v['question'])}</dt><dd><p class='answer'>{e(v['answer'])}</p>"
                    f"<p class='basis'>From the numbers ({e(v['section'])}): {e(v['basis'])}</p></dd>")
    body.append("</dl>")
    plot_after = {"2. Overhead": ["overhead.png", "epoch_times.png"],
                  "2b. Fixed costs per backend": ["fixed_costs.png"],
                  "3. Per-call latency": ["latency.png"], "4b. Cost vs work: runs in a store": ["scaling.png"],
                  "5. Fidelity": ["curves.png"], "6. Footprint": ["storage.png"],
                  "7. Capabilities, observed": ["mlflow_ui.png"]}
    captions = {**PLOTS, "mlflow_ui.png": "A run this compare measured, on its page in the MLflow UI (Model-training "
                                          "mode), rendered in headless Chromium"}
    for title, note, header, rows in sections(report):
        body.append(f"<h2>{e(title)}</h2><p>{e(note)}</p>")
        if rows:
            body.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
            for row in rows:
                cls = " class='bad'" if any(str(c).startswith("FAILED") for c in row) else ""
                body.append(f"<tr{cls}>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
            body.append("</tbody></table>")
        for name in plot_after.get(title, []):
            if name in plots or (name == "mlflow_ui.png" and (folder / name).exists()):
                body.append(img(name, captions[name]))
    style = ("body{font-family:system-ui,-apple-system,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
             "color:#222}table{border-collapse:collapse;width:100%;font-size:13px;margin:.5em 0 1.5em}"
             "th,td{border:1px solid #ccc;padding:4px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
             "tr.bad td{background:#fff0f0}figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}"
             "figcaption{font-size:12px;color:#555}.meta{color:#555}.warn{color:#b00;font-weight:bold}"
             ".verdicts dt{font-weight:bold;margin-top:.8em}.verdicts dd{margin:0 0 0 1em}.verdicts p{margin:.2em 0}"
             ".verdicts .basis{font-size:13px;color:#555}")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>MLflow vs W&amp;B comparison"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")
    (folder / "report.html").write_text(page, encoding="utf-8")


def _wrap(text: str, width: int, indent: str = "  ") -> list[str]:
    """A long line broken between words, continued indented: the terminal never gets a line cut with '...'."""
    return textwrap.wrap(text, width, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False) or [""]


def terminal_summary(report: dict, width: int = 100) -> str:
    meta = report["meta"]
    lines = ["=" * width, *_wrap("MLflow vs W&B" + ("" if meta.get("complete") else "  (INCOMPLETE: "
                                                    + str(meta.get("incomplete_reason")) + ")"), width), "=" * width]
    if warning := busy_warning(report):
        lines += _wrap(warning, width)
    for v in report.get("verdicts", []):
        lines += _wrap(f"- {v['question']}: {v['answer']}", width)
    lines.append("-" * width)
    results = report.get("results", {})
    if results:
        lines += _wrap(("Model results identical across trackers. " if results.get("identical") else
                        "Model results DIFFER across trackers. ") + "test acc: " + ", ".join(
            f"{t} {v['test/acc']['median']:.3f}" for t, v in results.get("by_tracker", {}).items()
            if v["test/acc"]["median"] is not None), width)
    lines.append(f"{'tracker':<8}{'whole run':>12}{'train loop':>12}{'extra s':>10}{'peak RSS':>10}"
                 f"{'disk/run':>11}{'lost':>6}")
    fidelity_lost: dict[str, int] = {}
    for run, backends in report.get("fidelity", {}).items():
        tracker = run.rsplit("-r", 1)[0]
        for f in backends.values():
            fidelity_lost[tracker] = fidelity_lost.get(tracker, 0) + (f["lost"] if f.get("status") == "ok" else 1)
    for tracker, e in report.get("overhead", {}).items():
        if tracker == "none":
            continue
        fp = report.get("footprint", {}).get(tracker, {})
        if e.get("status") != "ok":
            lines += _wrap(f"{tracker:<8}  {e.get('status')}: {e.get('reason')}", width, " " * 10)
            continue
        lines.append(f"{tracker:<8}{pct(e['wall_ratio']['median']):>12}{pct(e['fit_ratio']['median']):>12}"
                     f"{e['extra_wall_s']['median']:>9.1f}s{fp.get('peak_rss_mb', {}).get('median', 0):>8.0f}MB"
                     f"{fmt_bytes(fp.get('store_bytes_total', {}).get('median')):>11}"
                     f"{fidelity_lost.get(tracker, 0):>6}")
    lat = report.get("latency", {})
    if lat:
        lines += _wrap("log_metrics per call (layer / raw median): " + "; ".join(
            f"{b} {fmt_s(r['ops']['log_metrics']['layer']['median_s'])}/"
            f"{fmt_s(r['ops']['log_metrics']['raw']['median_s'])}"
            if isinstance(r, dict) and r.get("ops") else f"{b} {'skipped' if 'skipped' in r else 'FAILED'}"
            for b, r in lat.items()), width)
    for t in report.get("targets", []):
        lines += _wrap(f"[{verdict(t['met'])}] {t['target']}: {t['measured']}", width)
    for line in team_scale.summary_lines(report):
        lines += _wrap(line, width)
    return "\n".join(lines)


def write_report(report: dict[str, Any], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str, allow_nan=True))
    plots = []
    for name, plotter in PLOTTERS.items():
        try:
            if plotter(report, folder / name):
                plots.append(name)
        except Exception as exc:  # noqa: BLE001 - a plot that cannot be drawn is noted, the report still written
            report.setdefault("plot_errors", {})[name] = f"{type(exc).__name__}: {exc}"
            plt.close("all")
    report["plots"] = plots
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str, allow_nan=True))
    write_markdown(report, folder, plots)
    write_html(report, folder, plots)
    return plots
