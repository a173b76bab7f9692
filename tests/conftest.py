"""Shared fixtures: tiny generated data, tiny fast settings, and trackers isolated in tmp folders.

Nothing here touches the network, the user's home folder, or the project's own mlflow.db / wandb/.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One torch thread per process, set before anything imports torch: the suite runs a worker per core and one more
# (xdist) plus the training processes it starts, so more threads only wait on each other (OpenMP threads spin while
# they wait).
# Measured with test_trainer.py and test_selection.py side by side: 25 % and 10 % less CPU, 9-12 % less wall.
# Tests of the threads setting itself set or clear this variable as they need.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cxrtrack.tracking.readback import wandb_leet  # noqa: E402,F401 - re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Tiny, but every class in every split, and the Covid special formats (L, RGBA, 16-bit PNG) present.
TINY_COUNTS = {"train": {"Covid": 9, "Normal": 8, "Viral Pneumonia": 8},
               "test": {"Covid": 5, "Normal": 4, "Viral Pneumonia": 4}}


# -- running the scripts/ entry points, as a user types them -------------------------------------------------


def run_script(name: str, *args: str, subprocess_: bool = False, timeout=300,
               cwd=ROOT) -> subprocess.CompletedProcess:
    """Run scripts/<name> as `python scripts/<name> args...` from the folder ``cwd`` (the checkout by default).

    By default in this process (runpy, same code path, no 6 s of interpreter and torch start-up);
    ``subprocess_=True`` runs a real child process.
    """
    script = str(ROOT / "scripts" / name)
    if subprocess_:
        return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    out, err = io.StringIO(), io.StringIO()
    argv, before = sys.argv, os.getcwd()
    sys.argv = [script, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(before)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())  # the message is wrapped to the terminal width
    for fragment in fragments:
        assert fragment in text, (fragment, proc.stderr)


def pytest_configure(config):
    # Never reach a real tracker or a user's credentials from the tests.
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL",
                "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    base = Path(tempfile.mkdtemp(prefix="cxrtrack-tests-"))
    # A developer's `wandb login` (~/.netrc) must not make the offline tests go online.
    (base / "netrc").write_text("")
    os.environ["NETRC"] = str(base / "netrc")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["WANDB_SILENT"] = "true"
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[var] = str(base / var.lower())


# The files that take longest, longest first (seconds of one idle `make test`, from its --durations and a JUnit
# report). `make test` hands whole files to the xdist workers in collection order (`--dist loadfile
# --no-loadscope-reorder`); xdist's own order, by number of tests, started these few-test files last, so one
# worker ran them alone at the end while the other had finished. Started first, the many short files fill the end
# (longest-first list scheduling). Files not named keep pytest's order after these; a stale entry only costs time.
SLOWEST_FILES_FIRST = ["test_compare.py", "test_outage.py", "test_concurrency.py", "test_run_endings.py",
                       "test_tuning.py", "test_secrets.py", "test_tuning_scaleout.py", "test_compare_scale.py",
                       "test_replay.py", "test_mlflow_ui.py", "test_resume.py", "test_real_data.py", "test_quick.py",
                       "test_registry.py", "test_selection.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: tests keep their order


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Kaggle layout (generated once per test session)."""
    from cxrtrack.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny-data")
    generate_synthetic_dataset(root, seed=3, counts=TINY_COUNTS, size_range=(72, 140), n_large=0)
    return root


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory):
    """``empty_mlflow_store(path)`` puts at ``path`` a new, empty MLflow SQLite store and returns its URI.

    MLflow builds a new SQLite store by running its schema migrations (~0.9 s of CPU each time); here they run
    once per session (per xdist worker) and each store is a byte copy of that result, made with MLflow's own code
    and opened by MLflow like any store. For tests about what a run stores, not about how a store is created (the
    tests that create stores from nothing, and the trackers' migration lock, keep doing so); ``tiny_cfg``'s store is
    one."""
    import sqlite3

    import mlflow

    folder = tmp_path_factory.mktemp("mlflow-empty")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'made.db'}").search_experiments()
    template = folder / "mlflow.db"
    with contextlib.closing(sqlite3.connect(folder / "made.db")) as db:
        db.execute("VACUUM INTO ?", (str(template),))  # one self-contained file, whatever the journal mode

    def put(path: Path) -> str:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return put


@pytest.fixture(scope="session")
def migrated_server(empty_mlflow_store):
    """``migrated_server(folder)`` -> a real ``mlflow server`` (``benchmark/server.py``'s launcher, not started yet)
    whose store, ``folder/server.db``, starts as a copy of the empty one (``empty_mlflow_store``): for tests about
    what a server does with runs, not about how it creates its store (~1.5 CPU-s less per start)."""
    from cxrtrack.benchmark.server import MLflowServer

    def make(folder: Path):
        folder = Path(folder)
        return MLflowServer(folder, backend_store_uri=empty_mlflow_store(folder / "server.db"))

    return make


@pytest.fixture
def migrated_mlflow_db(tmp_path, empty_mlflow_store) -> Path:
    """tmp_path/mlflow.db (the store tiny_cfg names) as a new empty store (``empty_mlflow_store``), for a test that
    trains into it without tiny_cfg (tiny_cfg puts it there itself)."""
    empty_mlflow_store(tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


@pytest.fixture
def tiny_cfg(tmp_path, tiny_data_root, empty_mlflow_store):
    """configs/quick.yaml forced to tiny, fast settings and private tracker stores under tmp_path (the MLflow store
    already there: a copy of an empty one, see ``empty_mlflow_store``)."""
    from cxrtrack.config import load_config

    empty_mlflow_store(tmp_path / "mlflow.db")
    return load_config(
        CONFIGS / "quick.yaml",
        values={
            "data.path": str(tiny_data_root),
            "data.image_size": 64,
            "data.batch_size": 16,
            "training.epochs": 3,
            "training.early_stopping_patience": 0,
            "data.augment.enabled": True,  # the quick config turns it off (docs/speed.md); the tests train with it
            "evaluation.n_prediction_images": 6,
            "output_dir": str(tmp_path / "outputs"),
            "tracking.mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.mlflow.artifact_location": str(tmp_path / "mlartifacts"),
            "tracking.mlflow.system_metrics_interval": 1,
            "tracking.wandb.system_metrics_interval": 1,
            "tracking.wandb.dir": str(tmp_path),
            "tracking.wandb.mode": "auto",
            "tracking.tracker": "none",
        },
    )


def _project_state() -> dict[str, float]:
    """Path -> mtime of everything under the places in the project a run could write to."""
    state = {}
    for name in ("data", "outputs", "reports", "mlflow.db", "optuna.db", "mlartifacts", "mlruns", "wandb"):
        top = ROOT / name
        for path in [top, *top.rglob("*")] if top.is_dir() else [top] if top.exists() else []:
            state[str(path.relative_to(ROOT))] = path.lstat().st_mtime
    return state


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_project_alone():
    """Fail the session if any test created or changed the project's own data, outputs or tracker stores."""
    before = _project_state()
    yield
    after = _project_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into the project: {changed[:10]}"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m"):
    """A real, tiny file system (tmpfs) at ``path``: writes beyond ``size`` fail with ENOSPC. Needs root (CI runs
    as root); elsewhere the test is skipped and the injected-ENOSPC tests cover the same code paths."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip() or proc.returncode}); needs root. "
                    f"The injected OSError(ENOSPC) test covers the same code path.")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` with a filler file (leaving about ``leave`` bytes); returns the filler."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        free = shutil.disk_usage(folder).free - leave
        try:
            while free > 0:
                f.write(b"\0" * min(free, 1 << 16))
                free -= 1 << 16
            f.flush()
        except OSError:
            pass
    return filler
