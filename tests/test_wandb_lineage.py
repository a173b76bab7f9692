"""W&B side of issue 8, read back from the offline run with `wandb leet inspect --json`: the dataset artifact by
reference (no image copied), the model artifact's aliases and description, the epoch axis scoped to the metric
keys, the leet hint as printed, and `make evaluate` reporting back to the same run id."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_COUNTS, run_script, wandb_leet

pytestmark = pytest.mark.slow


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in wandb_leet(run_dir).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, tiny_data_root):
    from cxrtrack.config import load_config
    from tests.conftest import CONFIGS

    tmp = tmp_path_factory.mktemp("wandb-lineage")
    cfg = load_config(CONFIGS / "quick.yaml", values={
        "data.path": str(tiny_data_root), "data.image_size": 64, "data.batch_size": 16, "training.epochs": 2,
        "evaluation.n_prediction_images": 6, "output_dir": str(tmp / "outputs"), "tracking.tracker": "wandb",
        "tracking.wandb.dir": str(tmp), "tracking.register": True,
    })
    from cxrtrack.training.run import run_experiment

    result = run_experiment(copy.deepcopy(cfg))
    tracker = result.tracker.trackers[0]
    return tmp, result, tracker, records(tracker.run_dir)


def test_dataset_artifact_references_the_folder(wandb_run):
    _, result, _, recs = wandb_run
    datasets = [r["artifact"] for r in recs if r["type"] == "artifact" and r["artifact"]["type"] == "dataset"]
    assert len(datasets) == 1
    art = datasets[0]
    assert art["name"] == "cxr-synthetic"
    meta = json.loads(art["metadata"])
    assert meta["fingerprint"] == result.tags["dataset_fingerprint"]
    assert meta["splits"]["test"] == {"COVID-19": TINY_COUNTS["test"]["Covid"], "Normal": TINY_COUNTS["test"]["Normal"],
                                      "Viral Pneumonia": TINY_COUNTS["test"]["Viral Pneumonia"]}
    contents = art["manifest"]["contents"]
    n_images = sum(sum(c.values()) for c in TINY_COUNTS.values())
    assert len(contents) >= n_images  # every image (plus the generator's marker files) ...
    root = Path(meta["root"]).resolve().as_uri()
    assert all(c["ref"].startswith(root) and "local_path" not in c for c in contents)  # ... by reference, not copied
    assert f"fp-{meta['fingerprint']}" in art["aliases"]


def test_model_artifact_aliases_and_description(wandb_run):
    _, result, _, recs = wandb_run
    models = [r["artifact"] for r in recs if r["type"] == "artifact" and r["artifact"]["type"] == "model"]
    assert len(models) == 1
    model = models[0]
    assert {"latest", "best", "latest-synthetic"} <= set(model["aliases"])
    assert "champion" not in model["aliases"]  # offline: no server to read the current champion from
    meta = json.loads(model["metadata"])
    assert meta["dataset_fingerprint"] == result.tags["dataset_fingerprint"]
    assert meta["test/f1_macro"] == pytest.approx(result.test.metrics["f1_macro"])
    assert meta["registered"] is True and meta["run_name"] == result.run_name
    assert result.run_name in model["description"]


def test_epoch_axis_only_for_the_metric_keys(wandb_run):
    _, result, _, recs = wandb_run
    defined = {r["metric"]["name"]: r["metric"] for r in recs if r["type"] == "metric"}
    assert "*" not in defined
    stepped = {name for name, m in defined.items() if m.get("step_metric") == "epoch"}
    assert stepped == set(result.record.metrics)  # exactly the per-epoch metrics, no table or image
    assert "log10_lr" in stepped and "test/predictions" not in defined


def test_leet_hint_works_as_printed(wandb_run):
    tmp, _, tracker, _ = wandb_run
    hint = tracker.describe().split("inspect: ", 1)[1].split(";", 1)[0]
    proc = subprocess.run(f"{hint} --help", shell=True, capture_output=True, text=True, timeout=60,  # noqa: S602
                          env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")})
    assert proc.returncode == 0, (hint, proc.stderr[-500:])


def test_evaluate_reports_back_to_the_same_wandb_run(wandb_run):
    # scripts/evaluate.py in this process (runpy: the same code path, without a second interpreter and torch start-up);
    # it appends a new offline folder to the run and reads nothing the other tests of this module read
    tmp, result, tracker, _ = wandb_run
    before = set((tmp / "wandb").glob("offline-run-*"))
    proc = run_script("evaluate.py", "--model", str(result.run_dir / "checkpoints" / "best.pt"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = set((tmp / "wandb").glob("offline-run-*")) - before
    assert len(new) == 1 and next(iter(new)).name.endswith(tracker.run_ref()["run_id"])  # same run id: appended on sync
    summary = json.loads(wandb_leet(next(iter(new)), "--summary"))["summary"]
    fp8 = result.tags["dataset_fingerprint"][:8]
    assert summary[f"eval/{fp8}/acc"] == pytest.approx(result.test.metrics["acc"], abs=1e-6)
    assert summary[f"eval/{fp8}/f1_macro"] == pytest.approx(result.test.metrics["f1_macro"], abs=1e-6)
