"""Resume an interrupted run: `scripts/train.py --resume <run folder | MLflow run id | W&B run id>` (RESUME= in make).

Every epoch writes ``outputs/<run>/checkpoints/last.pt`` (weights, optimizer, scheduler, the loop's state and every
RNG state) beside ``best.pt``, and the run writes ``outputs/<run>/runs.json`` (each tracker's run reference) as
soon as its trackers have started. Resuming loads both: training continues at the next epoch in the same folder,
MLflow reopens the same run id, W&B continues the same run id (online: ``resume="must"``; offline: a new offline
folder with the same run id, which `make wandb-sync` appends to the run), so every epoch is logged exactly once.
The run keeps its own config (the one in ``last.pt``); ``--epochs`` may extend it, ``--tracker`` choose others.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrtrack.errors import CXRError

RUNS_FILE = "runs.json"


@dataclass
class ResumePoint:
    run_dir: Path
    run_name: str
    state: dict[str, Any]  # last.pt
    runs: dict[str, dict[str, Any]]  # backend -> run reference (run_id, ...)

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    def tracker_ids(self) -> dict[str, str]:
        return {backend: ref["run_id"] for backend, ref in self.runs.items() if ref and ref.get("run_id")}


def _refs(run_dir: Path) -> dict[str, dict[str, Any]]:
    sources = ((RUNS_FILE, lambda d: d.get("runs")), ("tracked.json", lambda d: d.get("extra", {}).get("runs")))
    for name, pick in sources:
        try:
            found = pick(json.loads((run_dir / name).read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            continue
        if found:
            return found
    return {}


def find_run_dir(ref: str, output_dir: str | Path) -> Path:
    """The run folder named by ``ref``: a folder (or a file inside it), else the run whose tracked MLflow or W&B run id
    is ``ref`` among the folders of ``output_dir``."""
    path = Path(ref).expanduser()
    if path.is_file():
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if path.is_dir():
        return path
    root = Path(output_dir)
    if (root / ref).is_dir():
        return root / ref
    for run_dir in sorted(root.glob("*/")) if root.is_dir() else []:
        if any(r and r.get("run_id") == ref for r in _refs(run_dir).values()):
            return run_dir
    raise CXRError(
        f"Cannot find the run {ref!r} to resume: it is not a folder, and no run in {root}/ was tracked with that "
        f"MLflow or W&B run id. Pass the run's folder (RESUME=outputs/<run>) or its run id as shown at the end of "
        f"the run."
    )


def load(ref: str, output_dir: str | Path) -> ResumePoint:
    import torch

    run_dir = find_run_dir(ref, output_dir)
    last = run_dir / "checkpoints" / "last.pt"
    study = next((kind for sub, kind in (("folds", "cross-validation"), ("seeds", "seed study"))
                  if (run_dir / sub).is_dir()), None)
    if study and not last.is_file():
        members = run_dir / ("folds" if study == "cross-validation" else "seeds")
        raise CXRError(
            f"{run_dir} is a {study} (its runs are in {members}/), "
            f"and --resume continues one interrupted run, not a {study}: its parent run cannot be rebuilt from a "
            f"resumed member. Start the {study} again with the same command (a new parent run; the interrupted one "
            f"and its finished runs stay in the stores)."
        )
    if not last.is_file():
        raise CXRError(
            f"{run_dir} has no checkpoints/last.pt, so it cannot be resumed: it stopped before its first epoch ended, "
            f"or it was trained by a version of cxrtrack that did not write one. Start a new run instead."
        )
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        state["epoch"], state["config"]  # noqa: B018 - present in every last.pt
    except Exception as exc:  # noqa: BLE001 - a damaged file is bad input, said in one paragraph
        raise CXRError(f"{last} cannot be read ({type(exc).__name__}: {exc}); it is damaged or not a last.pt of this "
                       f"project. Start a new run instead.") from None
    return ResumePoint(run_dir, str(state.get("run_name") or run_dir.name), state, _refs(run_dir))


def resume_config(point: ResumePoint, epochs: int | None = None, tracker: str | None = None) -> dict[str, Any]:
    """The run's own config (from last.pt), validated, with ``epochs`` / ``tracker`` if given."""
    from cxrtrack.config import validate, with_defaults
    from cxrtrack.errors import ConfigError

    cfg = with_defaults(copy.deepcopy(point.state["config"]))
    cfg["config_name"] = point.state["config"].get("config_name", "resumed")
    cfg["run_name"] = point.run_name
    if epochs is not None:
        cfg["training"]["epochs"] = epochs
    backends = [b for b in point.runs if b in ("mlflow", "wandb")]
    cfg["tracking"]["tracker"] = tracker or (",".join(backends) if backends else "none")
    try:
        validate(cfg)
    except ConfigError as exc:
        raise CXRError(f"The saved config of {point.run_dir} cannot be used: {exc}") from None
    if cfg["training"]["epochs"] <= point.epoch:
        raise CXRError(
            f"{point.run_name} already trained {point.epoch} of {cfg['training']['epochs']} epochs: nothing to resume. "
            f"Pass more epochs to continue it (EPOCHS={point.epoch + 10} / --epochs {point.epoch + 10})."
        )
    return cfg


def write_runs_file(run_dir: Path, run_name: str, refs: dict[str, dict[str, Any]]) -> None:
    from cxrtrack.utils import write_text_atomic

    write_text_atomic(run_dir / RUNS_FILE, json.dumps({"name": run_name, "runs": refs}, indent=2, default=str))
