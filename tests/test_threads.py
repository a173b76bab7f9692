"""The `threads` setting: how `auto` and a number resolve, what reaches torch, and what the config refuses."""

from __future__ import annotations

import time

import pytest
import torch

from cxrtrack import threads
from cxrtrack.config import ConfigError, load_config
from tests.conftest import CONFIGS


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_auto_is_one_thread_per_free_core(clean_env):
    clean_env.setattr(threads, "cpu_count", lambda: 8)
    clean_env.setattr(threads, "other_running_tasks", lambda: 0)
    assert threads.resolve_threads("auto") == 8  # an idle machine: torch's own default
    clean_env.setattr(threads, "other_running_tasks", lambda: 3)
    assert threads.resolve_threads("auto") == 5
    clean_env.setattr(threads, "other_running_tasks", lambda: 20)
    assert threads.resolve_threads("auto") == 1  # never fewer than one


def test_an_explicit_setting_or_omp_num_threads_wins_over_auto(clean_env):
    clean_env.setattr(threads, "other_running_tasks", lambda: 0)
    assert threads.resolve_threads(3) == 3
    clean_env.setenv("OMP_NUM_THREADS", "2")  # set by the user, or by tuning for its workers
    assert threads.resolve_threads("auto") == 2
    assert threads.resolve_threads(1) == 1


def test_apply_sets_torch_and_the_environment_and_auto_makes_idle_threads_sleep(clean_env):
    clean_env.setattr(threads, "other_running_tasks", lambda: 0)
    assert threads.apply_threads(1) == {"threads": 1, "omp_wait": "active"}
    assert torch.get_num_threads() == 1
    clean_env.setattr(threads, "cpu_count", lambda: 2)
    clean_env.delenv("OMP_NUM_THREADS")  # apply_threads(1) set it, as it does for the processes a run starts
    resolved = threads.apply_threads("auto")
    assert resolved == {"threads": 2, "omp_wait": "passive"} and torch.get_num_threads() == 2
    assert threads.os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and threads.os.environ["OMP_NUM_THREADS"] == "2"


def test_a_busy_process_is_another_running_task_and_this_process_own_threads_are_not():
    """A spinning child process is counted; a thread of this process (numpy's OpenBLAS pool spinning right after
    `import numpy` made `auto` pick one thread on an idle machine) is this process's, not another task."""
    import hashlib
    import subprocess
    import sys
    import threading

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        # running or runnable: state R either way. Polled, not sampled once after a fixed pause: a fresh-clone
        # `make test` once read 0 here 0.3 s after the start (the child still starting beside the other worker's
        # training, or this worker's own threads changing state between the two /proc reads)
        deadline = time.monotonic() + 15
        while threads.other_running_tasks() < 1:
            assert time.monotonic() < deadline, "a spinning child process was never counted as another running task"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()

    stop = threading.Event()
    data = b"x" * (1 << 22)

    def spin():  # hashlib releases the GIL on large buffers: the thread stays in state R beside this one
        while not stop.is_set():
            hashlib.sha256(data).digest()

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    try:
        own = []
        for _ in range(50):
            own.append(threads._own_running_tasks())
            time.sleep(0.002)
        assert max(own) >= 2
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("value", [0, -1, 2000, "two", True, 1.5])
def test_the_config_refuses_a_thread_count_that_is_not_auto_or_a_positive_integer(value):
    with pytest.raises(ConfigError, match="threads"):
        load_config(CONFIGS / "quick.yaml", values={"threads": value})


@pytest.mark.parametrize("value", ["auto", 1, 4])
def test_the_config_takes_auto_or_a_positive_integer(value):
    assert load_config(CONFIGS / "quick.yaml", values={"threads": value})["threads"] == value
