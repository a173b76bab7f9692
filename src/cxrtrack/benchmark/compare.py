"""``make compare``: measure how MLflow and W&B differ when they track the same training.

Phases (each recorded in ``report.json`` with its status and time; a phase that fails is reported as
failed and the others still run):

1. runs         the same config, seed and data with each tracker, interleaved, fresh processes
2. fidelity     every tracked run read back from its store and diffed with what the trainer sent
3. imports      time to import each client in a fresh interpreter
4. latency      per-call latency, tracker layer vs raw client, per backend (one process each; a real
                ``mlflow server`` on 127.0.0.1 for the server backend)
5. scaling      time and bytes as metric points and runs in a store grow
6. capabilities the observed capability matrix, with evidence
7. effort       integration effort counted from the code, and a fresh clone's first tracked runs
8. scale        with ``--scale`` (``make compare SCALE=1``): 1, 4, 16, 64 writer processes at once on an
                ``mlflow server`` on PostgreSQL, on one SQLite file and on W&B offline (``team_scale.py``)

``--only scale`` (``PHASES=scale``) runs only the phases it names.

Everything goes under ``reports/comparison/<timestamp>/``, including private tracker stores, so a
second compare never reads the first one's runs. Ctrl-C (or SIGTERM) stops the server, and writes the
report of what was measured, marked incomplete.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cxrtrack import signals
from cxrtrack.benchmark import capabilities, effort, team_scale
from cxrtrack.benchmark.runs import (
    RunMeasurement,
    Stores,
    as_dict,
    disk_bytes,
    interleaved,
    measure_run,
    train_command,
)
from cxrtrack.benchmark.server import MLflowServer
from cxrtrack.errors import ConfigError

log = logging.getLogger(__name__)

ALL_TRACKERS = ("none", "mlflow", "wandb", "both")
PHASES = ("runs", "fidelity", "imports", "server", "latency", "scaling", "capabilities", "effort", "scale")


@dataclass
class ComparePlan:
    project_root: Path
    config: Path
    out_root: Path  # reports/comparison
    repeats: int = 3
    trackers: list[str] = field(default_factory=lambda: list(ALL_TRACKERS))
    data: str | None = None
    quick: bool = False
    mlflow_uri: str | None = None  # a user's store instead of the private one
    extra_sets: list[str] = field(default_factory=list)
    fresh_clone: bool = True
    latency_cycles: int = 12
    point_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    run_sizes: tuple[int, ...] = (10, 100, 1_000)
    log_report: bool = True  # log the report into the measured runs
    import_samples: int = 3
    warmup: bool = True  # one unmeasured run first (the tests turn it off: they check the report, not timings)
    scale: bool = False  # the team-scale tier (``--scale``)
    scale_plan: team_scale.ScalePlan = field(default_factory=team_scale.ScalePlan)
    only: tuple[str, ...] = ()  # run only these phases (empty: all, the scale tier only with ``scale``)

    def wants(self, phase: str) -> bool:
        if self.only:
            return phase in self.only
        return phase != "scale" or self.scale

    @classmethod
    def make(cls, project_root: Path, config: str | None, repeats: int | None, trackers: str | None, quick: bool,
             **kw: Any) -> ComparePlan:
        config_path = Path(config or ("configs/quick.yaml")).expanduser()
        if not config_path.is_absolute():
            config_path = (Path.cwd() / config_path).resolve()
        if not config_path.is_file():
            raise ConfigError(f"CONFIG={config_path} is not a config file. Pass one of configs/*.yaml "
                              f"(default configs/quick.yaml).")
        names = [t.strip().lower() for t in (trackers or ",".join(ALL_TRACKERS)).split(",") if t.strip()]
        for name in names:
            if name not in ALL_TRACKERS:
                raise ConfigError(f"TRACKERS={trackers!r}: unknown tracker {name!r}; use a comma list of "
                                  f"{', '.join(ALL_TRACKERS)} (default: all four).")
        if "none" not in names:
            names.insert(0, "none")  # every ratio needs the no-tracker baseline
        n = 1 if quick and repeats is None else (repeats if repeats is not None else 3)
        if n < 1:
            raise ConfigError(f"REPEATS={repeats} must be at least 1.")
        only = parse_phases(kw.pop("only", None))
        plan = cls(project_root, config_path, Path(kw.pop("out_root", project_root / "reports" / "comparison")),
                   repeats=n, trackers=names, quick=quick, only=only, **kw)
        if quick:
            plan.latency_cycles, plan.point_sizes, plan.run_sizes = 6, (1_000, 10_000), (10, 100)
            plan.import_samples = 1
            plan.fresh_clone = kw.get("fresh_clone", False)
        return plan


def parse_phases(text: str | None) -> tuple[str, ...]:
    """``--only runs,fidelity`` -> ("runs", "fidelity"); an unknown name is refused."""
    names = tuple(p.strip().lower() for p in (text or "").split(",") if p.strip())
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        raise ConfigError(f"PHASES={text!r}: unknown phase {', '.join(unknown)}; use a comma list of "
                          f"{', '.join(PHASES)}.")
    return names


class Compare:
    def __init__(self, plan: ComparePlan):
        self.plan = plan
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = plan.out_root / stamp
        suffix = 1
        while self.dir.exists():  # two compares started in the same second
            suffix += 1
            self.dir = plan.out_root / f"{stamp}-{suffix}"
        self.dir.mkdir(parents=True)
        self.stores = Stores(self.dir / "stores", plan.mlflow_uri)
        self.group = f"compare-{self.dir.name}"
        self.report: dict[str, Any] = {"meta": {}, "phases": {}}
        self.server: MLflowServer | None = None
        self.runs: list[RunMeasurement] = []
        self.records: dict[str, Any] = {}  # run name -> backend -> RunRecord read back

    # -- the phases ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every phase in turn. Ctrl-C, or SIGTERM (timeout, docker, CI; :mod:`cxrtrack.signals`), stops the server
        it started and writes the partial report."""
        with signals.sigterm_as_interrupt():
            return self._run()

    def _run(self) -> dict[str, Any]:
        from cxrtrack.benchmark.report import write_report

        self.report["meta"] = self._meta()
        complete, reason = False, None
        try:
            for name in PHASES:
                if self.plan.wants(name):
                    self._phase(name, getattr(self, f"phase_{name}"))
            complete = True
        except KeyboardInterrupt:
            reason = "interrupted (Ctrl-C or SIGTERM) during the " + next(
                (k for k, v in reversed(self.report["phases"].items()) if v["status"] == "running"), "compare")
            log.warning("Compare %s; writing the partial report.", reason)
        finally:
            if self.server is not None:
                self.server.stop()
            for phase in self.report["phases"].values():
                if phase["status"] == "running":
                    phase["status"] = "interrupted"
            self._slim()
            self.report["meta"].update(finished=datetime.now().isoformat(timespec="seconds"), complete=complete,
                                       incomplete_reason=reason,
                                       wall_s=time.perf_counter() - self.report["meta"].pop("_t0"))
            self._analyse()
            write_report(self.report, self.dir)
        if complete and self.plan.log_report and self.runs:
            self._phase("log_report", self.phase_log_report)
            write_report(self.report, self.dir)  # with the log_report phase recorded
        return self.report

    def _slim(self) -> None:
        """Keep what the report needs: its numbers, logs, and the measured runs in their stores. Removed: the files
        only timing runs wrote (the random-byte artifacts uploaded to the server, any timing store left over) and
        the checkpoints of the measured runs (each run's model is in its stores). Sizes in ``meta.disk``."""
        removed: dict[str, int] = {}
        targets = [("server artifacts of the latency runs (random bytes)",
                    [self.dir / "stores" / "server" / "server-artifacts"]),
                   ("timing stores left over",
                    [*(self.dir / "latency").glob("*/"), *(self.dir / "scaling").glob("*/")]),
                   ("team-scale stores and writers' files (the journals are kept)",
                    [*(self.dir / "team-scale").glob("*/store"), *(self.dir / "team-scale").glob("*/server"),
                     *(self.dir / "team-scale").glob("*/*-writers/work-*")]),
                   ("checkpoints of the measured runs", list(self.stores.outputs.glob("*/checkpoints")))]
        for what, paths in targets:
            for path in paths:
                if path.is_dir():
                    removed[what] = removed.get(what, 0) + disk_bytes(path)
                    shutil.rmtree(path, ignore_errors=True)
        self.report["meta"]["disk"] = {"removed_bytes": removed, "kept_bytes": disk_bytes(self.dir),
                                       "kept_by_part": {p.name: disk_bytes(p) for p in sorted(self.dir.iterdir())
                                                        if p.is_dir()}}

    def _phase(self, name: str, fn) -> None:
        entry: dict[str, Any] = {"status": "running"}
        self.report["phases"][name] = entry
        log.info("compare: %s ...", name)
        start = time.perf_counter()
        try:
            fn()
            entry["status"] = "ok"
        except KeyboardInterrupt:
            entry["seconds"] = round(time.perf_counter() - start, 2)
            raise
        except Exception as exc:  # noqa: BLE001 - one failed phase must not lose the others
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log.warning("compare: %s failed (%s: %s); the other phases go on.", name, type(exc).__name__, exc)
        entry["seconds"] = round(time.perf_counter() - start, 2)

    def phase_runs(self) -> None:
        plan = self.plan
        order = interleaved(plan.trackers, plan.repeats)
        self.report["runs"] = []

        def run(tracker: str, repeat: int, name: str) -> RunMeasurement:
            command = train_command(plan.project_root, plan.config, tracker, name, self.stores, plan.data,
                                    [f"tracking.group={self.group}", *plan.extra_sets])
            return measure_run(command, tracker, repeat, name, self.stores, self.dir / "logs")

        # One untimed run first: the first process after a pause pays for cold file caches and a CPU that has
        # not ramped up, and without this that cost would always land on the first tracker in the order.
        if plan.warmup:
            warmup = run("none", 0, "warmup")
            self.report["meta"]["warmup_s"] = round(warmup.wall_s, 2)
            log.info("compare: warm-up run (not measured): %.1f s, %s", warmup.wall_s,
                     "ok" if warmup.ok else warmup.error)
        for i, (repeat, tracker) in enumerate(order, 1):
            m = run(tracker, repeat, f"{tracker}-r{repeat}")
            self.runs.append(m)
            self.report["runs"].append(as_dict(m))
            state = "ok" if m.ok else f"FAILED ({m.error})"
            log.info("compare: run %d/%d %-6s repeat %d: %.1f s, %s", i, len(order), tracker, repeat, m.wall_s, state)

    def phase_fidelity(self) -> None:
        from cxrtrack.tracking.readback import RunRecord, diff_records, read_mlflow, read_wandb, total_lost

        out: dict[str, Any] = {}
        for m in self.runs:
            if m.tracker == "none" or not m.runs:
                continue
            sent = RunRecord.from_json((Path(m.run_dir) / "tracked.json").read_text())
            out[m.run_name] = {}
            self.records[m.run_name] = {}
            for backend, ref in m.runs.items():
                try:
                    stored = read_mlflow(ref["tracking_uri"], ref["run_id"]) if backend == "mlflow" else \
                        read_wandb(ref["run_dir"])
                except Exception as exc:  # noqa: BLE001 - a run that cannot be read back is itself a finding
                    out[m.run_name][backend] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                    continue
                self.records[m.run_name][backend] = stored
                sections = diff_records(sent, stored, backend)
                out[m.run_name][backend] = {
                    "status": "ok", "lost": total_lost(sections),
                    "sections": {k: {"logged": s.logged, "found": s.found, "missing": s.missing,
                                     "mismatched": s.mismatched} for k, s in sections.items()},
                }
        self.report["fidelity"] = out
        curves: dict[str, Any] = {}  # the first repeat's curves as each store holds them, for the overlay plot
        for name in sorted(self.records, key=lambda n: (n.rsplit("-r", 1)[1], n)):
            for backend, record in self.records[name].items():
                label = f"{backend} store ({name})"
                if not any(k.startswith(backend) for k in curves):
                    curves[label] = {k: record.metrics.get(k, []) for k in ("train/loss", "val/loss", "val/acc")}
        self.report["curves"] = curves

    def phase_imports(self) -> None:
        """Seconds to import each client in a fresh interpreter that has already imported what training needs.

        One interpreter per client and sample: it times the training stack first, then the client, so the stack's
        own time comes from the same processes (one interpreter fewer per sample than timing it separately)."""
        base = "import torch, torchvision, sklearn, matplotlib, numpy"
        result: dict[str, Any] = {}
        stack: list[float] = []
        for client in ("mlflow", "wandb"):
            samples = []
            for _ in range(self.plan.import_samples):
                code = (f"import time; t0 = time.perf_counter(); {base}; t1 = time.perf_counter(); import {client}; "
                        f"print(t1 - t0, time.perf_counter() - t1)")
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
                stack_s, client_s = (float(x) for x in proc.stdout.strip().splitlines()[-1].split())
                stack.append(stack_s)
                samples.append(client_s)
            result[client] = {"median_s": statistics.median(samples), "samples": samples}
        result["training stack (torch, torchvision, sklearn, matplotlib)"] = {"median_s": statistics.median(stack),
                                                                              "samples": stack}
        self.report["imports"] = result

    def phase_server(self) -> None:
        self.server = MLflowServer(self.dir / "stores" / "server")
        self.server.start()
        self.report["server"] = {"uri": self.server.uri, "start_s": self.server.start_s}

    def _workload_run(self) -> RunMeasurement:
        for m in self.runs:  # a finished run's config and metrics are the latency workload
            if m.ok and (Path(m.run_dir) / "tracked.json").exists() and (Path(m.run_dir) / "plots").exists():
                return m
        raise RuntimeError("no finished training run to take the workload from")

    def phase_latency(self) -> None:
        run_dir = Path(self._workload_run().run_dir)
        wanted = ["mlflow-sqlite", "mlflow-sqlite-async", "mlflow-server", "wandb-offline", "wandb-online"]
        result: dict[str, Any] = {}
        for backend in wanted:
            skip = self._skip_reason(backend)
            if skip:
                result[backend] = {"skipped": skip}
                continue
            out = self.dir / "latency" / f"{backend}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "cxrtrack.benchmark.latency", "--backend", backend, "--run-dir",
                       str(run_dir), "--store", str(self.dir / "latency" / backend), "--cycles",
                       str(self.plan.latency_cycles), "--out", str(out)]
            if backend == "mlflow-server" and self.server is not None:  # (else skipped above)
                command += ["--uri", self.server.uri]
            result[backend] = self._subprocess_json(command, out, self.dir / "logs" / f"latency-{backend}.log",
                                                    self._scratch_env(self.dir / "latency" / backend))
            # ~0.5 GB of timing runs: keep the numbers
            shutil.rmtree(self.dir / "latency" / backend, ignore_errors=True)
            log.info("compare: latency %s done", backend)
        self.report["latency"] = result

    def _skip_reason(self, backend: str) -> str | None:
        if backend == "mlflow-server" and self.server is None:
            return "the mlflow server could not be started (see the server phase)"
        if backend == "wandb-online":
            from cxrtrack.tracking.wandb_tracker import api_key_configured

            if not api_key_configured():
                return "no W&B API key configured (WANDB_API_KEY or `wandb login`)"
            host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
            try:
                socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443),
                                         timeout=3).close()
            except OSError as exc:
                return f"W&B server {host} unreachable ({exc})"
        return None

    @staticmethod
    def _scratch_env(store: Path) -> dict[str, str]:
        """W&B stages a copy of every logged file in its data dir (1 and 20 MB artifacts, every cycle): for timing
        runs, inside their own store, so that removing the store removes them."""
        return {"WANDB_DATA_DIR": str(store / "wandb-data"), "WANDB_CACHE_DIR": str(store / "wandb-cache")}

    def _subprocess_json(self, command: list[str], out: Path, log_file: Path,
                         env: dict[str, str] | None = None) -> dict[str, Any]:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "wb") as log_out:
            proc = subprocess.run(command, stdout=log_out, stderr=subprocess.STDOUT, cwd=self.dir,
                                  env={**os.environ, **self.stores.env(), **(env or {})})
        if proc.returncode != 0 or not out.exists():
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            return {"failed": f"exit code {proc.returncode}: {tail[0][:300]} (log: {log_file})"}
        return json.loads(out.read_text())

    def phase_scaling(self) -> None:
        sizes_p = ",".join(map(str, self.plan.point_sizes))
        sizes_r = ",".join(map(str, self.plan.run_sizes))
        jobs = {("points", "mlflow-sqlite"): sizes_p, ("points", "mlflow-server"): sizes_p,
                ("points", "wandb-offline"): sizes_p, ("runs", "mlflow-sqlite"): sizes_r,
                ("runs", "mlflow-server"): sizes_r}
        result: dict[str, Any] = {"points": {}, "runs": {}}
        for (what, backend), sizes in jobs.items():
            if backend == "mlflow-server" and self.server is None:
                result[what][backend] = {"skipped": "the mlflow server could not be started"}
                continue
            out = self.dir / "scaling" / f"{what}-{backend}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "cxrtrack.benchmark.scaling", "--backend", backend, "--what", what,
                       "--sizes", sizes, "--store", str(self.dir / "scaling" / f"{what}-{backend}"), "--out", str(out)]
            if backend == "mlflow-server" and self.server is not None:  # (else skipped above)
                command += ["--uri", self.server.uri, "--db", str(self.server.folder / "server.db")]
            store = self.dir / "scaling" / f"{what}-{backend}"
            log_file = self.dir / "logs" / f"scaling-{what}-{backend}.log"
            result[what][backend] = self._subprocess_json(command, out, log_file, self._scratch_env(store))
            shutil.rmtree(store, ignore_errors=True)  # the timing runs themselves: the numbers are kept
            log.info("compare: scaling %s %s done", what, backend)
        result["runs"]["wandb-offline"] = {
            "skipped": "not measurable offline: W&B keeps no local run index; "
                       "listing and searching runs is a W&B server API (wandb.Api().runs)"}
        self.report["scaling"] = result

    def phase_capabilities(self) -> None:
        stored: dict[str, Any] = {}
        for name in sorted(self.records):
            for backend, record in self.records[name].items():
                stored.setdefault(backend, record)
        screenshot, page = self._screenshot_mlflow_ui()
        self.report["capabilities"] = capabilities.observe(stored, self.report.get("latency", {}),
                                                           self.server.uri if self.server else None, self.dir,
                                                           self.group, screenshot, page)

    def _screenshot_mlflow_ui(self) -> tuple[Path | None, str | None]:
        """The MLflow UI's page of a run this compare measured, in Model-training mode (``run_url``), rendered in
        headless Chromium: an http store is shown by its own server, the private SQLite store by a second
        ``mlflow server`` on it for the time of the screenshot."""
        from cxrtrack.tracking.mlflow_store import is_http, run_url

        chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        ref = next((m.runs["mlflow"] for m in self.runs if m.ok and (m.runs.get("mlflow") or {}).get("run_id")), None)
        if not chromium or ref is None:
            return None, None
        path = self.dir / "mlflow_ui.png"
        viewer = None
        try:
            if is_http(ref["tracking_uri"]):
                base = ref["tracking_uri"]
            else:
                viewer = MLflowServer(self.dir / "stores" / "ui", backend_store_uri=ref["tracking_uri"]).start()
                base = viewer.uri
            url = run_url(base, ref.get("experiment_id"), ref["run_id"])
            with open(self.dir / "logs" / "chromium.log", "wb") as out:
                subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                f"--user-data-dir={self.dir / 'stores' / 'chromium'}", "--window-size=1400,900",
                                "--virtual-time-budget=15000", f"--screenshot={path}", url],
                               stdout=out, stderr=subprocess.STDOUT, timeout=120)
        finally:
            if viewer is not None:
                viewer.stop()
            shutil.rmtree(self.dir / "stores" / "chromium", ignore_errors=True)  # the browser profile: not evidence
        return (path, url) if path.exists() else (None, url)

    def phase_effort(self) -> None:
        result = effort.measure_effort()
        result["first_run"] = self._first_runs()
        self.report["effort"] = result

    def _first_runs(self) -> dict[str, Any]:
        """Time from a fresh clone to a first tracked run, per tracker, as a new user types it."""
        if not self.plan.fresh_clone:
            first = {}
            for m in self.runs:
                if m.tracker in ("mlflow", "wandb") and m.tracker not in first and m.ok:
                    first[m.tracker] = {"seconds": m.wall_s, "how": "first run of this compare (a fresh process on "
                                        "data already generated); QUICK skips the fresh clone"}
            return first
        clone = self.dir / "fresh-clone"
        start = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(self.plan.project_root), str(clone)], check=True, timeout=300)
        clone_s = time.perf_counter() - start
        venv = self.plan.project_root / ".venv"
        if venv.exists():
            (clone / ".venv").symlink_to(venv)
        out = {"clone_s": clone_s, "install": "not re-measured (the project's .venv is reused; `make install` "
                                              "takes ~3-4 min here, see README)"}
        env = {**os.environ, "WANDB_DATA_DIR": str(clone / "wandb-data"), "WANDB_CACHE_DIR": str(clone / "wandb-cache")}
        env.pop("MLFLOW_TRACKING_URI", None)
        for tracker in ("mlflow", "wandb"):
            target = f"{tracker}-quick"
            start = time.perf_counter()
            with open(self.dir / "logs" / f"fresh-clone-{target}.log", "wb") as log_out:
                proc = subprocess.run(["make", target] + ([f"DATA={self.plan.data}"] if self.plan.data else []),
                                      cwd=clone, stdout=log_out, stderr=subprocess.STDOUT, env=env, timeout=1800)
            out[tracker] = {"command": f"make {target}", "seconds": time.perf_counter() - start,
                            "exit_code": proc.returncode,
                            "how": "fresh clone, first target run (synthetic data generated on the first one)"}
        return out

    def phase_scale(self) -> None:
        """The team-scale tier (:mod:`cxrtrack.benchmark.team_scale`): N concurrent writers per store."""
        self.report["team_scale"] = team_scale.measure(self.plan.scale_plan, self.dir / "team-scale")

    def phase_log_report(self) -> None:
        """The report, as an artifact of every MLflow run it measured and of one W&B run in the same group."""
        import mlflow

        logged: dict[str, Any] = {"mlflow": [], "wandb": None}
        for m in self.runs:
            ref = m.runs.get("mlflow")
            if ref and ref.get("run_id"):
                client = mlflow.MlflowClient(tracking_uri=ref["tracking_uri"])
                for name in ("report.html", "report.md", "report.json"):
                    client.log_artifact(ref["run_id"], str(self.dir / name), artifact_path="comparison")
                logged["mlflow"].append(ref["run_id"])
        if any("wandb" in m.runs for m in self.runs):
            logged["wandb"] = self._wandb_report_run()
        self.report["logged_report"] = logged

    def _wandb_report_run(self) -> str:
        code = (
            "import sys, wandb\n"
            "run = wandb.init(mode=sys.argv[1], project=sys.argv[2], name=sys.argv[3], group=sys.argv[3], "
            "job_type='comparison', dir=sys.argv[4], settings=wandb.Settings(silent=True))\n"
            "art = wandb.Artifact('comparison-report', type='report')\n"
            "for p in sys.argv[5:]: art.add_file(p)\n"
            "run.log_artifact(art); print(run.settings.sync_dir); run.finish()\n")
        project = next(m.runs["wandb"]["project"] for m in self.runs if "wandb" in m.runs)
        mode = next(m.runs["wandb"]["mode"] for m in self.runs if "wandb" in m.runs)
        files = [str(self.dir / n) for n in ("report.html", "report.md", "report.json")]
        proc = subprocess.run([sys.executable, "-c", code, mode, project, self.group, str(self.stores.root), *files],
                              capture_output=True, text=True, timeout=300, env={**os.environ, **self.stores.env()},
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"W&B report run failed: {proc.stderr.strip().splitlines()[-1:]}")
        return proc.stdout.strip().splitlines()[-1]

    # -- analysis: the numbers the report shows -----------------------------------------------------
    def _analyse(self) -> None:
        from cxrtrack.benchmark.analysis import analyse

        analyse(self.report)

    def _meta(self) -> dict[str, Any]:
        import importlib.metadata

        import psutil
        import yaml

        from cxrtrack.provenance import git_info

        versions = {}
        for package in ("torch", "torchvision", "mlflow", "wandb", "numpy", "scikit-learn", "optuna"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return {
            "_t0": time.perf_counter(),
            "started": datetime.now().isoformat(timespec="seconds"),
            "quick": self.plan.quick,
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                        "platform": platform.platform(terse=True), "python": platform.python_version()},
            "versions": versions,
            "git": git_info(self.plan.project_root),
            "config_file": str(self.plan.config),
            "config": yaml.safe_load(self.plan.config.read_text()),
            "overrides": self.plan.extra_sets,
            "data": self.plan.data or "(the training targets' default: data/kaggle, else the synthetic set)",
            "trackers": self.plan.trackers,
            "phases_run": [p for p in PHASES if self.plan.wants(p)],
            "repeats": self.plan.repeats,
            "order": [f"{t}-r{r}" for r, t in interleaved(self.plan.trackers, self.plan.repeats)],
            "group": self.group,
            "stores": str(self.stores.root) if self.plan.mlflow_uri is None else self.plan.mlflow_uri,
            "seed_note": "every run uses the config's seed; see config.seed",
        }


__all__ = ["Compare", "ComparePlan"]
