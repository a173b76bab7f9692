"""The identical experiment with each tracker, interleaved, each in a fresh process.

``scripts/train.py`` is started once per (repeat, tracker), in the order none, mlflow, wandb, both,
none, mlflow, ... so that slow drifts of a noisy machine hit every tracker alike, and import and
start-up costs count as a user pays them. For each run we keep: the exit code, wall time seen from
outside, the run's own ``timings.json`` (training loop, tracker start, per-epoch logging, final
logging, finish, per-call costs), ``tracked.json`` (what it sent), peak RSS of the training process
and of its process tree, the extra processes it spawned (W&B's service), the bytes each store grew by,
and the machine's load just before and just after it (load average, CPU busy and steal shares).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass
class Stores:
    """Where the compare's runs go: a private store per compare unless the user passes one."""

    root: Path
    mlflow_uri: str | None = None  # None: sqlite under root

    @property
    def uri(self) -> str:
        return self.mlflow_uri or f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def overrides(self) -> list[str]:
        sets = [f"output_dir={self.outputs}", f"tracking.mlflow.tracking_uri={self.uri}",
                f"tracking.wandb.dir={self.root}"]
        if self.mlflow_uri is None:
            sets.append(f"tracking.mlflow.artifact_location={self.root / 'mlartifacts'}")
        return sets

    def env(self) -> dict[str, str]:
        # W&B stages artifact copies in its data dir: keep them beside the runs, to measure and to clean up
        return {"WANDB_DATA_DIR": str(self.root / "wandb-data"), "WANDB_CACHE_DIR": str(self.root / "wandb-cache")}

    def sizes(self) -> dict[str, int]:
        """Bytes on disk of each part of the stores (sampled before and after every run)."""
        parts = {"mlflow.db": self.root / "mlflow.db", "mlartifacts": self.root / "mlartifacts",
                 "wandb": self.root / "wandb", "wandb-data": self.root / "wandb-data",
                 "wandb-cache": self.root / "wandb-cache"}
        return {name: disk_bytes(path) for name, path in parts.items()}


def disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = Path(root, name)
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def _cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat (user nice system idle iowait irq softirq steal ...), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:9]] if fields and fields[0] == "cpu" else None


def machine_load(window: float = 0.5) -> dict[str, float | None]:
    """The machine's load now: load averages, and over ``window`` seconds the share of all cores that was busy
    (anything but idle and iowait) and stolen by the hypervisor (steal). Taken while no training runs, busy is
    what other programs use."""
    load1: float | None
    load5: float | None
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:
        load1 = load5 = None
    first = _cpu_times()
    time.sleep(window)
    second = _cpu_times()
    busy = steal = None
    if first and second:
        delta = [b - a for a, b in zip(first, second, strict=True)]
        total = sum(delta)
        if total > 0:
            idle = delta[3] + delta[4]
            steal = 100.0 * delta[7] / total
            busy = 100.0 * (total - idle - delta[7]) / total
    return {"load1": load1, "load5": load5, "busy_pct": busy, "steal_pct": steal}


@dataclass
class RunMeasurement:
    tracker: str
    repeat: int
    run_name: str
    exit_code: int | None = None
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0  # the training process itself (the kernel's high-water mark)
    # the training process's peak + the peak of every lasting process it started (each the kernel's high-water
    # mark): an upper bound of the tree's peak, never below the process's own; the sampled sum at one instant,
    # a lower bound that can miss a short spike, is kept beside it
    peak_tree_rss_mb: float = 0.0
    peak_tree_sampled_mb: float = 0.0
    load_before: dict[str, float | None] = field(default_factory=dict)  # machine_load() just before the run
    load_after: dict[str, float | None] = field(default_factory=dict)  # and just after it
    spawned: dict[str, float] = field(default_factory=dict)  # lasting extra process name -> its peak RSS (MB)
    brief_children: dict[str, int] = field(default_factory=dict)  # short-lived subprocesses (git, ...) -> count
    store_bytes: dict[str, int] = field(default_factory=dict)  # growth of each store part during the run
    timings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)  # test and best metrics the run tracked
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # backend -> run reference (ids, folders)
    run_dir: str = ""
    log_file: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None


class TreeSampler(threading.Thread):
    """Samples the RSS of one or more process trees (each root and its descendants) every ``interval`` seconds:
    per tree the peak of its summed RSS, over all trees the peak of the total and of the process count, and every
    process's own peak as the kernel counts it (``VmHWM`` in /proc/<pid>/status), so a spike between two samples
    is not missed. One sampler serves a measured training run (one root, ``measure_run``) and the team-scale
    tier's writers (many roots, ``team_scale``)."""

    def __init__(self, roots: list[int], interval: float = 0.2):
        super().__init__(daemon=True)
        self.roots, self.interval = list(roots), interval
        self.stop_event = threading.Event()
        self.peak_root = [0] * len(self.roots)  # each root process's own peak (high-water mark when readable)
        self.peak_tree = [0] * len(self.roots)  # each tree's summed RSS, sampled
        self.peak_total = self.peak_processes = 0
        # pid -> [name, samples seen, peak rss (high-water mark when readable), index of its root]
        self.children: dict[int, list] = {}

    @property
    def peak_main(self) -> int:
        return self.peak_root[0] if self.roots else 0

    def spawned(self, min_samples: int = 3) -> tuple[dict[str, int], dict[str, int]]:
        """(long-lived children: name -> peak RSS, short-lived ones such as `git`: name -> count)."""
        lasting: dict[str, int] = {}
        brief: dict[str, int] = {}
        for name, seen, rss, _ in self.children.values():
            if seen >= min_samples:
                lasting[name] = max(lasting.get(name, 0), rss)
            else:
                brief[name] = brief.get(name, 0) + 1
        return lasting, brief

    def lasting_peaks_sum(self, root: int = 0, min_samples: int = 3) -> int:
        """Sum over the lasting children of tree ``root`` (each pid) of their own peak RSS."""
        return sum(rss for _, seen, rss, r in self.children.values() if seen >= min_samples and r == root)

    def peak_tree_own(self, root: int, min_samples: int = 3) -> int:
        """Tree ``root``'s peak counted per process (the root's own peak plus each lasting child's): never below a
        spike that fell between two samples; an upper bound, as the peaks need not have been at the same time."""
        return self.peak_root[root] + self.lasting_peaks_sum(root, min_samples)

    def sample(self) -> bool:
        """One sample of every tree; False when no tree is left."""
        total = processes = 0
        alive = False
        for i, pid in enumerate(self.roots):
            try:
                root = psutil.Process(pid)
                rss = root.memory_info().rss
                descendants = root.children(recursive=True)
            except psutil.Error:
                continue
            alive = True
            self.peak_root[i] = max(self.peak_root[i], rss, high_water_mark(pid))
            tree, processes = rss, processes + 1
            for child in descendants:
                try:
                    child_rss = child.memory_info().rss
                    entry = self.children.setdefault(child.pid, [child.name(), 0, 0, i])
                except psutil.Error:
                    continue
                entry[1] += 1
                entry[2] = max(entry[2], child_rss, high_water_mark(child.pid))
                tree, processes = tree + child_rss, processes + 1
            self.peak_tree[i] = max(self.peak_tree[i], tree)
            total += tree
        self.peak_total = max(self.peak_total, total)
        self.peak_processes = max(self.peak_processes, processes)
        return alive

    def run(self) -> None:
        while not self.stop_event.is_set():
            if not self.sample() and len(self.roots) == 1:
                return  # the measured run has ended
            self.stop_event.wait(self.interval)


def high_water_mark(pid: int) -> int:
    """The process's peak RSS in bytes as the kernel counts it (VmHWM), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


REGISTERED_MODEL = "CustomCXRNet-compare"


def train_command(project_root: Path, config: Path, tracker: str, run_name: str, stores: Stores,
                  data: str | None, extra_sets: list[str]) -> list[str]:
    command = [sys.executable, str(project_root / "scripts" / "train.py"), "--config", str(config),
               "--tracker", tracker, "--run-name", run_name]
    if data:
        command += ["--data", str(data)]
    # A full training registers its model, and the compare measures that cost, so its runs register although the
    # quick config does not; under a name of their own, so a user's store never gets compare runs as CustomCXRNet.
    registry = ["tracking.register=true", f"tracking.mlflow.registered_model_name={REGISTERED_MODEL}"]
    for item in [*stores.overrides(), *registry, *extra_sets]:
        command += ["--set", item]
    return command


def measure_run(command: list[str], tracker: str, repeat: int, run_name: str, stores: Stores,
                logs: Path, env: dict[str, str] | None = None) -> RunMeasurement:
    """Run one training process and measure it from outside; never raises for a failed run."""
    m = RunMeasurement(tracker, repeat, run_name)
    logs.mkdir(parents=True, exist_ok=True)
    m.log_file = str(logs / f"{run_name}.log")
    before = stores.sizes()
    m.load_before = machine_load()
    child_env = {**os.environ, **stores.env(), **(env or {})}
    with open(m.log_file, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env)
        sampler = TreeSampler([process.pid])
        sampler.start()
        try:
            # os.wait4 also returns the child's own resource usage: ru_maxrss is its peak RSS (KiB on Linux)
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM: let the training process end its run cleanly first
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        finally:
            sampler.stop_event.set()
            sampler.join()
        m.wall_s = time.perf_counter() - start
        process.returncode = m.exit_code = os.waitstatus_to_exitcode(status)
    m.load_after = machine_load()
    # the kernel's own count of the process's peak (wait4's ru_maxrss, KiB) joins the sampler's, which a spike
    # between two samples can escape; the tree's figure then comes from the sampler's one definition of it
    sampler.peak_root[0] = max(sampler.peak_root[0], usage.ru_maxrss * 1024)
    m.peak_rss_mb = sampler.peak_main / 2**20
    m.peak_tree_sampled_mb = sampler.peak_tree[0] / 2**20
    m.peak_tree_rss_mb = sampler.peak_tree_own(0) / 2**20
    lasting, brief = sampler.spawned()
    m.spawned = {name: round(rss / 2**20, 1) for name, rss in lasting.items()}
    m.brief_children = brief
    after = stores.sizes()
    m.store_bytes = {k: after[k] - before.get(k, 0) for k in after}
    run_dir = stores.outputs / run_name
    m.run_dir = str(run_dir)
    try:
        m.timings = json.loads((run_dir / "timings.json").read_text())
        tracked = json.loads((run_dir / "tracked.json").read_text())
        m.summary = tracked["summary"]
        m.runs = tracked["extra"].get("runs", {})
    except (OSError, ValueError, KeyError) as exc:
        m.error = f"no timings/record written ({type(exc).__name__}: {exc})"
    if m.exit_code != 0:
        m.error = f"exit code {m.exit_code}; see {m.log_file}: " + _last_error_line(Path(m.log_file))
    return m


def _last_error_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "Traceback" in line:
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


def interleaved(trackers: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, tracker) in the order the runs are made: none, mlflow, wandb, both, none, mlflow, ..."""
    return [(r, t) for r in range(1, repeats + 1) for t in trackers]


def as_dict(m: RunMeasurement) -> dict[str, Any]:
    return {**asdict(m), "ok": m.ok}
