"""How many CPU threads torch uses: the ``threads`` setting (``THREADS=`` in make).

torch starts one OpenMP thread per core, and idle OpenMP threads busy-wait (spin) for work by default. That is
the fastest setting for one process on an idle machine and the worst for several: two trainings at once on
2 cores each ran about 6x slower than alone, instead of 2x, because each process's threads wait at every
parallel region for a thread the other process has descheduled (``make threads-benchmark``; the figures are
in docs/model-quality.md, "Threads and load").

``threads: auto`` (the default) decides once, at start-up: one thread per core that is free at that moment
(the cores minus the other tasks the kernel is running, never fewer than one), and OpenMP's passive wait
policy (idle threads sleep instead of spinning), which costs nothing alone and halves the loss when another
job starts later. On an idle machine that is exactly torch's own default. ``threads: n`` pins ``n``; an
``OMP_NUM_THREADS`` set by the user or a parent process (tuning workers split the cores this way) wins over
``auto``. The thread count is decided once per process, not adapted during a run: results depend slightly on
it (the order of floating-point sums), so it is tracked as the param ``resolved.threads`` and a run can be
repeated with the same value.

OpenMP reads its environment variables when torch is imported, so entry points call :func:`apply_threads`
before their first ``import torch``; when torch is already loaded it calls ``torch.set_num_threads`` (the wait
policy then stays what it was). This module imports nothing heavy.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask: a container's or ``taskset``'s), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _own_running_tasks() -> int:
    """Threads of this process the kernel counts as running (state R): this one, plus any a library started,
    such as OpenBLAS's pool when numpy is imported, which spins for a moment after it starts."""
    running = 0
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat", encoding="ascii") as f:
                    running += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue
    except OSError:
        pass
    return max(1, running)


def other_running_tasks(samples: int = 5, interval_s: float = 0.01) -> int:
    """Tasks the kernel is running or could run now, besides this process's own (``/proc/loadavg``'s running
    count, median of a few samples 10 ms apart: the load average itself lags by a minute). 0 where unknown."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                total = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, total - _own_running_tasks()))
        if i + 1 < samples:
            time.sleep(interval_s)
    return int(statistics.median(counts))


def resolve_threads(setting: Any) -> int:
    """``threads`` as a number of threads for this process (see the module doc)."""
    if setting in (None, "auto"):
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) > 0:
            return int(env)
        return max(1, cpu_count() - other_running_tasks())
    return max(1, int(setting))


def apply_threads(setting: Any) -> dict[str, Any]:
    """Set this process's thread count (and, for ``auto``, OpenMP's passive wait); returns what is in force."""
    n = resolve_threads(setting)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    if setting in (None, "auto"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = sys.modules.get("torch")
    if torch is not None:  # already loaded (a library caller, the tests): the environment came too late for it
        torch.set_num_threads(n)
    return resolved_threads()


def resolved_threads() -> dict[str, Any]:
    """The thread settings in force in this process (tracked as ``resolved.threads`` and ``resolved.omp_wait``)."""
    torch = sys.modules.get("torch")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    n = torch.get_num_threads() if torch is not None else (int(env) if env.isdigit() else cpu_count())
    return {"threads": n, "omp_wait": os.environ.get("OMP_WAIT_POLICY", "active").lower()}
