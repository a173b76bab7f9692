"""Search spaces in both formats: parsing, the W&B -> Optuna translation, clear errors naming the key, and the
samplers' draws (bounds, log scale, integers, categorical choices). No training here: fast."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
import yaml

from cxrtrack.errors import ConfigError
from cxrtrack.tuning.optuna_search import make_sampler, sampler_name
from cxrtrack.tuning.space import BaseConfig, check_spec, parse_space
from cxrtrack.tuning.sweep_format import load_spec, parse_sweep
from tests.conftest import CONFIGS, ROOT

BASE = BaseConfig(str(CONFIGS / "tune" / "quick.yaml"))


def write(tmp_path, data, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_shipped_spaces_load_and_pass_the_checks():
    mlflow = load_spec(CONFIGS / "mlflow" / "hyperparameters.yaml")
    sweep = load_spec(CONFIGS / "wandb" / "sweep.yaml")
    for spec in (mlflow, sweep):
        check_spec(spec, BASE)
        assert spec.metric == "val/loss" and spec.direction == "minimize" and spec.trials == 8
    assert (mlflow.format, mlflow.method, mlflow.pruner.type) == ("optuna", "tpe", "median")
    # W&B's bayes runs on Optuna's Gaussian-process sampler; hyperband's min_iter/eta become HyperbandPruner's
    assert (sweep.format, sweep.method, sweep.pruner.type) == ("wandb", "gp", "hyperband")
    assert (sweep.pruner.min_epochs, sweep.pruner.reduction_factor) == (4, 3)
    # ... except with a pruner: the search really runs on TPE, and the announcement says that (not "gp")
    assert sampler_name(sweep).startswith("TPE (asked for a Gaussian process")
    assert type(make_sampler(sweep, seed=0, worker_seed=1, budget=8)).__name__ == "TPESampler"
    assert sampler_name(mlflow) == "TPE"
    lr = sweep.param("training.lr")
    assert (lr.kind, lr.log, lr.low, lr.high) == ("float", True, 0.0002, 0.005)
    rotation = sweep.param("data.augment.rotation")  # q_uniform 0..15, q=3: the multiples of 3
    assert (rotation.kind, rotation.low, rotation.high, rotation.step) == ("int", 0, 15, 3)


def test_our_format_every_form():
    spec = parse_space({
        "method": "random", "metric": "val/f1_macro", "direction": "maximize", "trials": 5,
        "params": {
            "training.lr": {"distribution": "log_uniform", "low": "1e-4", "high": 0.01},  # YAML's text 1e-4 is read
            "training.optimizer": ["adam", "sgd"],
            "model.dropout_conv": [[0.1, 0.2, 0.3], [0.25, 0.3, 0.4]],
            "data.batch_size": {"distribution": "int_uniform", "low": 8, "high": 32, "step": 8},
            "model.dropout_dense": {"distribution": "uniform", "low": 0.1, "high": 0.5, "step": 0.1},
            "training.epochs": 2,
            "training.scheduler": {"value": "cosine"},
        }})
    check_spec(spec, BASE)
    assert spec.fixed == {"training.epochs": 2, "training.scheduler": "cosine"}
    assert spec.param("training.lr").low == 1e-4 and spec.param("training.lr").log
    assert spec.param("data.batch_size").grid_values() == [8, 16, 24, 32]
    assert spec.param("model.dropout_dense").grid_values() == [0.1, 0.2, 0.3, 0.4, 0.5]
    conv = spec.param("model.dropout_conv")
    assert [conv.decode(v) for v in conv.grid_values()] == [[0.1, 0.2, 0.3], [0.25, 0.3, 0.4]]


def test_wandb_sweep_translation_of_each_distribution():
    spec = parse_sweep({
        "method": "random", "metric": {"name": "val/acc", "goal": "maximize", "target": 0.99}, "run_cap": 4,
        "early_terminate": {"type": "hyperband", "max_iter": 27, "s": 2, "eta": 3},
        "parameters": {
            "training": {"parameters": {
                "lr": {"distribution": "log_uniform", "min": math.log(1e-4), "max": math.log(1e-2)},
                "weight_decay": {"distribution": "inv_log_uniform_values", "min": 1e-6, "max": 1e-3}}},
            "data.batch_size": {"min": 8, "max": 32},  # integers: W&B infers int_uniform
            "model.dropout_dense": {"min": 0.1, "max": 0.5},  # W&B infers uniform
            "training.optimizer": {"values": ["adam", "sgd"]},
            "training.epochs": {"value": 3},
        }})
    lr = spec.param("training.lr")  # log_uniform: min/max are natural-log exponents
    assert lr.log and math.isclose(lr.low, 1e-4) and math.isclose(lr.high, 1e-2)
    wd = spec.param("training.weight_decay")
    assert wd.log and (wd.low, wd.high) == (1e-6, 1e-3)
    assert spec.param("data.batch_size").kind == "int" and spec.param("model.dropout_dense").kind == "float"
    assert spec.fixed == {"training.epochs": 3} and spec.target == 0.99 and spec.trials == 4
    assert spec.pruner.min_epochs == 3  # max_iter / eta^s = 27 / 9
    check_spec(spec, BASE)


@pytest.mark.parametrize("space, fragment", [
    ({"method": "grid", "metric": {"name": "val/loss"}, "paramters": {}}, "unknown key 'paramters'"),
    ({"method": "bayes", "metric": {"name": "val/loss"},
      "parameters": {"training.lr": {"distribution": "log_uniformm", "min": 0.1, "max": 1}}},
     "distribution 'log_uniformm', which W&B does not define. Did you mean 'log_uniform'"),
    ({"method": "random", "metric": {"name": "val/loss"}, "parameters": {"training.lr": {"min": 0.01, "max": 0.001}}},
     "parameter 'training.lr' (uniform) needs min below max"),
    ({"method": "random", "metric": {"name": "val/loss"}, "parameters": {"training.lr": {"min": "1e-4", "max": 0.01}}},
     "YAML reads a number like 1e-4"),
    ({"method": "random", "metric": {"name": "val/loss"},
      "parameters": {"training.lr": {"distribution": "int_uniform", "min": 1, "max": 2.5}}},
     "int_uniform, so 'max' must be a whole number"),
    ({"method": "random", "metric": {"name": "val/loss"},
      "parameters": {"training.lr": {"distribution": "normal", "mu": 0, "sigma": 1}}},
     "cannot run: Optuna samples bounded ranges"),
    ({"method": "random", "metric": {"name": "val/loss"},
      "parameters": {"training.lr": {"values": [0.1], "maximum": 3}}},
     "unknown key 'maximum' in parameter 'training.lr'"),
    ({"method": "hyperopt", "metric": {"name": "val/loss"}, "parameters": {"training.lr": {"values": [0.1]}}},
     "method 'hyperopt' is not one W&B defines"),
    ({"method": "random", "metric": {"name": "val/loss", "goal": "minimise"},
      "parameters": {"training.lr": {"values": [0.1]}}},
     "goal must be minimize or maximize"),
    ({"method": "grid", "metric": {"name": "val/loss"}, "early_terminate": {"type": "hyperband"},
      "parameters": {"training.lr": {"values": [0.1]}}},
     "needs min_iter, or max_iter together with s"),
])
def test_invalid_sweep_files_name_the_key(tmp_path, space, fragment):
    with pytest.raises(ConfigError) as err:
        load_spec(write(tmp_path, space))
    assert fragment in str(err.value)


@pytest.mark.parametrize("params, fragment", [
    ({"training.lrr": [0.001]}, "Did you mean 'training.lr'"),  # not a config key
    ({"data.batch_size": {"distribution": "uniform", "low": 8, "high": 32}}, "must be of type integer"),
    ({"model.dropout_dense": {"distribution": "uniform", "low": 0.1, "high": 1.5}}, "must be a number between 0 and 1"),
    ({"training.lr": {"distribution": "log_uniform", "low": 0.0, "high": 0.1}}, "lower bound must be above 0"),
    ({"training.lr": {"distribution": "gaussian", "low": 0.0, "high": 0.1}}, "distribution 'gaussian'"),
    ({"tracking.tracker": ["mlflow", "wandb"]}, "cannot be searched"),
    ({"training.optimizer": ["adam", "lion"]}, "choose one of adam, adamw, sgd"),
])
def test_bad_parameters_are_refused_before_any_trial(params, fragment):
    with pytest.raises(ConfigError) as err:
        check_spec(parse_space({"metric": "val/loss", "params": params}, "space.yaml"), BASE)
    assert fragment in str(err.value) and "space.yaml" in str(err.value)


@pytest.mark.parametrize("data, fragment", [
    ({"metric": "test/acc", "direction": "maximize", "params": {"training.lr": [0.1]}}, "test split is never used"),
    ({"metric": "val/acc", "direction": "minimize", "params": {"training.lr": [0.1]}},
     "set the direction (goal) to maximize"),
    ({"method": "grid", "params": {"training.lr": {"distribution": "uniform", "low": 0.001, "high": 0.01}}},
     "grid search needs a list"),
    ({"methd": "grid", "params": {"training.lr": [0.1]}}, "Did you mean 'method'"),
    ({"params": {"training.lr": [0.1]}, "pruner": {"type": "hyperbnd"}}, "Did you mean 'hyperband'"),
])
def test_bad_study_settings_are_refused(data, fragment):
    with pytest.raises(ConfigError) as err:
        check_spec(parse_space(data, "space.yaml"), BASE)
    assert fragment in str(err.value)


def test_an_invalid_sweep_is_one_paragraph_and_exit_status_2(tmp_path):
    bad = write(tmp_path, {"method": "bayes", "metric": {"name": "val/loss"}, "run_cap": 2,
                           "parameters": {"training.lr": {"distribution": "loguniform", "min": 0.001, "max": 0.1}}})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune.py"), "--tracker", "wandb", "--space", str(bad),
                           "--config", str(CONFIGS / "tune" / "quick.yaml")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("error:"):]
    assert "\n\n" not in message.strip()  # one paragraph
    words = " ".join(message.split())  # wrapped to the terminal's width: where the lines break depends on the path
    assert "'training.lr'" in words and "loguniform" in words and "Did you mean 'log_uniform'" in words


SAMPLED = {
    "training.lr": {"distribution": "log_uniform", "low": 1e-5, "high": 1e-1},
    "model.dropout_dense": {"distribution": "uniform", "low": 0.1, "high": 0.4},
    "data.batch_size": {"distribution": "int_uniform", "low": 8, "high": 40, "step": 4},
    "training.scheduler_patience": {"distribution": "int_log_uniform", "low": 1, "high": 64},
    "training.optimizer": ["adam", "adamw", "sgd"],
    "model.dropout_conv": [[0.1, 0.2, 0.3], [0.25, 0.3, 0.4]],
}


@pytest.mark.parametrize("method", ["random", "tpe", "gp"])
def test_samplers_respect_bounds_log_scales_integers_and_choices(method):
    spec = parse_space({"method": method, "metric": "val/loss", "trials": 40, "params": SAMPLED})
    check_spec(spec, BASE)
    study = optuna.create_study(sampler=make_sampler(spec, seed=0, worker_seed=1, budget=40))
    draws = []

    def objective(trial):
        values = {p.key: p.suggest(trial) for p in spec.params}
        draws.append(values)
        return math.log10(values["training.lr"]) ** 2 + values["model.dropout_dense"]  # a smooth stand-in metric

    study.optimize(objective, n_trials=40 if method != "gp" else 15)
    for v in draws:
        assert 1e-5 <= v["training.lr"] <= 1e-1 and isinstance(v["training.lr"], float)
        assert 0.1 <= v["model.dropout_dense"] <= 0.4
        assert isinstance(v["data.batch_size"], int) and 8 <= v["data.batch_size"] <= 40
        assert v["data.batch_size"] % 4 == 0
        assert isinstance(v["training.scheduler_patience"], int) and 1 <= v["training.scheduler_patience"] <= 64
        assert v["training.optimizer"] in ("adam", "adamw", "sgd")
        assert v["model.dropout_conv"] in ([0.1, 0.2, 0.3], [0.25, 0.3, 0.4])  # decoded back to the list
        BASE.load(v)  # every draw is a config training accepts
    distributions = study.trials[0].distributions
    assert distributions["training.lr"].log and distributions["training.scheduler_patience"].log
    assert not distributions["model.dropout_dense"].log


def test_a_log_scale_spreads_draws_over_the_decades():
    spec = parse_space({"method": "random", "metric": "val/loss", "params": {
        "training.lr": {"distribution": "log_uniform", "low": 1e-5, "high": 1e-1}}})
    study = optuna.create_study(sampler=make_sampler(spec, seed=0, worker_seed=7, budget=400))
    study.optimize(lambda t: spec.param("training.lr").suggest(t), n_trials=400)
    decades = [math.floor(math.log10(t.params["training.lr"])) for t in study.trials]
    # log-uniform over 4 decades: each decade gets about a quarter (a uniform draw would put ~90% in the last one)
    for d in (-5, -4, -3, -2):
        assert 0.15 < decades.count(d) / len(decades) < 0.35


def test_bayes_runs_on_a_gaussian_process_and_on_tpe_when_trials_are_pruned():
    sweep = load_spec(CONFIGS / "wandb" / "sweep.yaml")  # bayes with hyperband
    assert isinstance(make_sampler(sweep, 0, 1, 8), optuna.samplers.TPESampler)  # GP would ignore pruned trials
    sweep.pruner.type = "none"
    assert isinstance(make_sampler(sweep, 0, 1, 8), optuna.samplers.GPSampler)


def test_every_value_an_integer_range_can_draw_is_checked_not_only_its_bounds():
    """data.channels takes 1 or 3: a range 1..3 has valid bounds, but a trial could draw 2."""
    spec = parse_space({"metric": "val/loss", "params": {"data.channels": {"distribution": "int_uniform", "low": 1,
                                                                            "high": 3}}}, "space.yaml")
    with pytest.raises(ConfigError, match="parameter 'data.channels'.*'data.channels' is 2; choose one of 1, 3"):
        check_spec(spec, BASE)
