"""Registry lifecycle and dataset lineage, read back from a real SQLite MLflow registry (and offline W&B).

Who registers (tracking.register), the tags and description of a version, `latest-<source>` and `champion`
aliases (champion moves only when the test metric beats it on the same data fingerprint), the dataset inputs
of the run, and `make evaluate MODEL=models:/CustomCXRNet@champion` reporting back to the champion's run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrtrack.config import load_config, set_dotted
from cxrtrack.errors import ConfigError
from cxrtrack.tracking import registry
from tests.conftest import CONFIGS, ROOT, run_script

PLAN = {"metric": "test/f1_macro", "mode": "max", "fingerprint": "abc", "metrics": {"test/f1_macro": 0.8}}


def test_beats_compares_only_on_the_same_fingerprint():
    assert registry.beats(PLAN, None)[0]
    assert registry.beats(PLAN, {"dataset_fingerprint": "abc", "test/f1_macro": "0.7"})[0]
    assert not registry.beats(PLAN, {"dataset_fingerprint": "abc", "test/f1_macro": "0.8"})[0]  # a tie keeps it
    moved, why = registry.beats(PLAN, {"dataset_fingerprint": "other", "test/f1_macro": "0.1"})
    assert not moved and "other data" in why
    assert registry.beats({**PLAN, "mode": "min"}, {"dataset_fingerprint": "abc", "test/f1_macro": "0.9"})[0]


def test_a_carved_test_split_is_said_and_never_displaces_an_official_champion(tiny_cfg):
    """A folder without test/ gets a test split carved out of train/: its score is not an official test score.
    The version says so (description, `test_split` tag) and cannot take `champion` from an official one."""
    common = {"source": "local", "fingerprint": "abc", "run_name": "r", "git_commit": "g",
              "test_metrics": {"test/f1_macro": 0.99}}
    carved = registry.build_plan(tiny_cfg, test_split="carved", **common)
    official = registry.build_plan(tiny_cfg, **common)
    assert "carved out of train/" in carved["description"] and "carved" not in official["description"]
    assert registry.version_tags(carved)["test_split"] == "carved"
    assert registry.version_tags(official)["test_split"] == "official"
    champion = {"dataset_fingerprint": "abc", "test/f1_macro": "0.5", "test_split": "official"}
    moved, why = registry.beats(carved, champion)
    assert not moved and "carved" in why
    assert registry.beats(official, champion)[0]
    assert registry.beats(carved, None)[0]  # the first version still becomes champion, with its caveat
    assert registry.beats(carved, {**champion, "test_split": "carved"})[0]  # carved against carved: same data


def test_register_setting_defaults_and_errors():
    cfg = load_config(CONFIGS / "train.yaml")
    assert cfg["tracking"]["register"] == "auto"
    assert registry.should_register(cfg, "kaggle")[0]
    assert not registry.should_register(cfg, "synthetic")[0]
    assert not registry.should_register(load_config(CONFIGS / "quick.yaml"), "kaggle")[0]  # the quick targets
    assert registry.should_register(load_config(CONFIGS / "quick.yaml", ["tracking.register=true"]), "synthetic")[0]
    with pytest.raises(ConfigError, match="tracking.register"):
        load_config(CONFIGS / "train.yaml", ["tracking.register=yes please"])
    with pytest.raises(ConfigError, match="test metric"):
        load_config(CONFIGS / "train.yaml", ["tracking.champion_metric=val/acc"])


@pytest.mark.slow
def test_registry_lifecycle_lineage_and_evaluate_reports_back(tmp_path, tiny_cfg, tiny_data_root, monkeypatch,
                                                              empty_mlflow_store):
    import mlflow

    from cxrtrack.data.synthetic import generate_synthetic_dataset
    from cxrtrack.training.run import run_experiment
    from tests.conftest import TINY_COUNTS

    uri = tiny_cfg["tracking"]["mlflow"]["tracking_uri"]
    assert uri == empty_mlflow_store(tmp_path / "mlflow.db")  # a new, empty store (its migrations run once a session)
    client = mlflow.MlflowClient(tracking_uri=uri)

    def train(**values):
        cfg = copy.deepcopy(tiny_cfg)
        for key, value in {"tracking.tracker": "mlflow", **values}.items():
            set_dotted(cfg, key.split("."), value)
        result = run_experiment(cfg)
        return result, result.tracker.trackers[0]

    # 1. The default on synthetic data (quick config: register false): the model is logged, nothing registered.
    first, tracker = train()
    assert tracker.model_uri and tracker.registered is None
    assert client.search_registered_models() == []

    # 2. Registering on purpose: version 1, tagged, described, champion and latest-synthetic.
    a, ta = train(**{"tracking.register": True, "training.epochs": 2})
    b, tb = train(**{"tracking.register": True, "training.epochs": 3})
    versions = {str(v.version): v for v in client.search_model_versions("name='CustomCXRNet'")}
    assert set(versions) == {"1", "2"}
    v1, v2 = versions["1"], versions["2"]
    assert v1.run_id == ta.run_id and v2.run_id == tb.run_id
    for version, result in ((v1, a), (v2, b)):
        assert version.tags["dataset_source"] == "synthetic"
        assert version.tags["dataset_fingerprint"] == result.record.tags["dataset_fingerprint"]
        assert version.tags["config"] == "quick" and version.tags["git_commit"] == result.tags["git_commit"]
        assert version.tags["run_name"] == result.run_name
        assert float(version.tags["test/f1_macro"]) == pytest.approx(result.test.metrics["f1_macro"])
        assert result.run_name in version.description and "test/f1_macro" in version.description
    # champion: version 2 only if its test macro-F1 beats version 1's on the same data
    expected = "2" if b.test.metrics["f1_macro"] > a.test.metrics["f1_macro"] else "1"
    assert str(client.get_model_version_by_alias("CustomCXRNet", "champion").version) == expected
    assert str(client.get_model_version_by_alias("CustomCXRNet", "latest-synthetic").version) == "2"

    # 3. Other data (another fingerprint): latest-synthetic moves, the champion never does.
    other_root = tmp_path / "other-data"
    generate_synthetic_dataset(other_root, seed=11, counts=TINY_COUNTS, size_range=(72, 140), n_large=0)
    c, tc = train(**{"tracking.register": True, "data.path": str(other_root)})
    assert c.tags["dataset_fingerprint"] != a.tags["dataset_fingerprint"]
    assert str(client.get_model_version_by_alias("CustomCXRNet", "champion").version) == expected
    assert str(client.get_model_version_by_alias("CustomCXRNet", "latest-synthetic").version) == "3"

    # The experiment opens as a model-training experiment; the run's last line carries its page.
    run = client.get_run(tb.run_id)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{tb.run_id}?workflowType=machine_learning"
            in b.tracker.describe())
    assert run.data.tags["mlflow.note.content"].startswith("CustomCXRNet, config quick: 3 epochs")
    view = json.loads(client.get_experiment(run.info.experiment_id).tags["mlflow.sharedViewState.cxrtrack-curves-v1"])
    overlaid = [c["selectedMetricKeys"] for c in view["compareRunCharts"]]
    assert ["train/loss", "val/loss"] in overlaid and ["train/acc", "val/acc"] in overlaid
    assert set(sum(overlaid, [])) <= set(b.record.metrics)  # every charted key is one the run logs
    assert "viewStateShareKey=cxrtrack-curves-v1" in b.tracker.describe()

    # 4. Dataset lineage: one input per split, digest = the content fingerprint, class counts as the profile.
    run = client.get_run(tb.run_id)
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    for split, dataset in inputs.items():
        assert dataset.digest == b.tags["dataset_fingerprint"]
        assert dataset.name == f"cxr-synthetic-{split}"
        assert json.loads(dataset.source)["uri"] == Path(b.record.extra["dataset"]["root"]).resolve().as_uri()
        assert Path(b.record.extra["dataset"]["root"]).is_relative_to(tiny_data_root)
        profile = json.loads(dataset.profile)
        assert profile["num_images"] == sum(profile[k] for k in ("COVID-19", "Normal", "Viral Pneumonia"))
    assert json.loads(inputs["test"].profile)["COVID-19"] == TINY_COUNTS["test"]["Covid"]
    assert json.loads(inputs["train"].profile)["num_images"] + json.loads(inputs["val"].profile)["num_images"] == \
        sum(TINY_COUNTS["train"].values())

    # 5. make evaluate MODEL=models:/CustomCXRNet@champion: the champion's checkpoint, results back to its run.
    champion_run = ta.run_id if expected == "1" else tb.run_id
    champion_result = a if expected == "1" else b
    env = {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    evaluate = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", "models:/CustomCXRNet@champion"]
    proc = subprocess.run(evaluate, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Logged back to MLflow run {champion_run}" in proc.stdout
    fp8 = champion_result.tags["dataset_fingerprint"][:8]
    stored = client.get_run(champion_run).data.metrics
    # the same checkpoint on the same data: the training run's own test numbers
    assert stored[f"eval/{fp8}/acc"] == pytest.approx(champion_result.test.metrics["acc"], abs=1e-6)
    assert stored[f"eval/{fp8}/f1_macro"] == pytest.approx(champion_result.test.metrics["f1_macro"], abs=1e-6)
    files = {f.path for f in client.list_artifacts(champion_run, "evaluations")}
    assert f"evaluations/{champion_result.tags['dataset_fingerprint']}.json" in files
    assert client.get_run(champion_run).info.status == "FINISHED"
    # evaluated twice: a second folder and a second point, nothing overwritten (this time in this process: runpy, the
    # same code path, without a second interpreter and torch start-up; the child process above did the real command)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    proc = run_script("evaluate.py", *evaluate[2:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Logged back to MLflow run {champion_run}" in proc.stdout
    assert [m.step for m in client.get_metric_history(champion_run, f"eval/{fp8}/acc")] == [1, 2]
    assert len(list((tmp_path / "outputs").glob(f"eval-{champion_result.run_name}-{fp8}*"))) == 2


def test_evaluate_rejects_an_unknown_reference_fast(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", "nonsense-ref"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert "Cannot tell what 'nonsense-ref' is" in proc.stderr and "models:/CustomCXRNet@champion" in proc.stderr
