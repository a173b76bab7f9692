"""The W&B-server sweep path (``wandb.sweep`` + ``wandb.agent``). The W&B server cannot be reached from this
machine, so its three calls (create the sweep, hand out parameters to the agent, report the best run) are
replaced by stand-ins that behave as the server does; everything else (reading the parameters the agent writes,
training, the offline W&B runs, the best config) is the real code."""

from __future__ import annotations

import json
import types

import pytest
import wandb
import yaml

from cxrtrack.config import load_config
from cxrtrack.errors import ConfigError
from cxrtrack.tracking.readback import read_wandb, wandb_leet
from cxrtrack.tuning.space import BaseConfig
from cxrtrack.tuning.wandb_sweep import online_requested, tune_online
from tests.conftest import CONFIGS
from tests.test_tuning import tiny_base

SWEEP = {"name": "online", "method": "random", "metric": {"name": "val/loss", "goal": "minimize"}, "run_cap": 2,
         "parameters": {"training.lr": {"values": [0.001, 0.003]}, "training.optimizer": {"values": ["adam", "sgd"]}}}


def summary_metric(run_dir, key="val/loss") -> float:
    """The run's summary value of ``key`` as W&B's sweep controller reads it (read_wandb leaves out summary keys
    that are also history metrics)."""
    return json.loads(wandb_leet(run_dir, "--summary"))["summary"][key]


def test_auto_uses_the_w_and_b_server_only_with_an_api_key(monkeypatch):
    base = BaseConfig(str(CONFIGS / "tune" / "quick.yaml"))
    assert online_requested(base, "auto", None) is False  # no key here: the local sweep
    with pytest.raises(ConfigError, match="needs W&B online: an API key"):
        online_requested(base, "wandb", None)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert online_requested(base, "auto", None) is True
    monkeypatch.setenv("WANDB_MODE", "offline")  # forcing offline wins
    assert online_requested(base, "auto", None) is False


@pytest.mark.slow
def test_online_sweep_creates_the_sweep_runs_the_agent_function_and_writes_the_best_config(tmp_path, tiny_data_root,
                                                                                        monkeypatch):
    space = tmp_path / "sweep.yaml"
    space.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    base = tiny_base(tmp_path, tiny_data_root)
    base.values["tracking.wandb.mode"] = "offline"  # the trial runs themselves are written offline here
    calls, runs = {}, []
    choices = [{"training.lr": 0.003, "training.optimizer": "adam"},
               {"training.lr": 0.001, "training.optimizer": "sgd"}]

    def fake_sweep(config, project=None, entity=None):
        calls["sweep"] = (config, project, entity)
        return "sw123"

    def fake_agent(sweep_id, function=None, project=None, entity=None, count=None):
        calls["agent"] = (sweep_id, project, count)
        for i, values in enumerate(choices[:count]):  # what W&B's agent does before calling the function
            path = tmp_path / f"config-{i}.yaml"
            path.write_text(yaml.safe_dump({k: {"value": v} for k, v in values.items()}))
            monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(path))
            monkeypatch.setenv("WANDB_RUN_ID", f"run{i}")
            before = set(tmp_path.glob("wandb/offline-run-*"))
            function()
            runs.append((values, (set(tmp_path.glob("wandb/offline-run-*")) - before).pop()))

    def fake_api():
        stored = [(values, read_wandb(run_dir)) for values, run_dir in runs]
        values, best = min(stored, key=lambda item: summary_metric(item[1].extra["run_dir"]))  # the server's choice
        run = types.SimpleNamespace(config=dict(values), summary={"val/loss": summary_metric(best.extra["run_dir"])})
        sweep = types.SimpleNamespace(config=SWEEP, best_run=lambda: run)
        return types.SimpleNamespace(sweep=lambda path: sweep)

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    monkeypatch.setattr(wandb, "agent", fake_agent)
    monkeypatch.setattr(wandb, "Api", fake_api)
    assert tune_online(space, base, sweep_id=None, trials=None, required=True)

    config, project, _ = calls["sweep"]
    assert {k: v for k, v in config.items() if k != "project"} == SWEEP and project == "cxr-tune"  # the file, unchanged
    assert calls["agent"] == ("sw123", "cxr-tune", 2)  # run_cap agents' runs
    for values, run_dir in runs:
        stored = read_wandb(run_dir)
        assert {k: stored.params[k] for k in values} == values and stored.extra["job_type"] == "trial"
        # the sweep reads the summary: it holds the best val/loss (the checkpoint's), not the last epoch's
        assert summary_metric(run_dir) == pytest.approx(min(v for _, v in stored.metrics["val/loss"]))
    best_config = tmp_path / "outputs" / "tune" / "online" / "best_config.yaml"
    best_values = min(((v, summary_metric(d)) for v, d in runs), key=lambda x: x[1])[0]
    cfg = load_config(best_config)
    assert cfg["training"]["lr"] == best_values["training.lr"]
    assert cfg["training"]["optimizer"] == best_values["training.optimizer"]


def test_a_sweep_server_that_cannot_be_reached_falls_back_to_the_local_sweep(tmp_path, monkeypatch):
    space = tmp_path / "sweep.yaml"
    space.write_text(yaml.safe_dump(SWEEP, sort_keys=False))

    def unreachable(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "sweep", unreachable)
    base = BaseConfig(str(CONFIGS / "tune" / "quick.yaml"))
    assert tune_online(space, base, sweep_id=None, trials=None, required=False) is False
    with pytest.raises(Exception, match="did not accept the sweep"):
        tune_online(space, base, sweep_id=None, trials=None, required=True)
