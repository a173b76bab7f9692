"""Make variables reach the scripts as data: quotes, backquotes, $(...) and ; in DATA, RUN_NAME, ARGS, CHECKPOINT,
OUT or MLFLOW_TRACKING_URI are characters of the value, never shell (or make) code. PY and VENV point the
targets at a recorder that writes the arguments it received."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def recorder(tmp_path) -> Path:
    script = tmp_path / "bin" / "python"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump(sys.argv[1:], open(os.environ['RECORD'], 'w'))\n")
    script.chmod(0o755)
    (tmp_path / "bin" / "mlflow").symlink_to(script)
    return script


def make(tmp_path, recorder, *args, env=None) -> tuple[subprocess.CompletedProcess, list[str]]:
    record = tmp_path / "argv.json"
    record.unlink(missing_ok=True)
    proc = subprocess.run(["make", "-s", *args, f"PY={recorder}", f"VENV={recorder.parent.parent}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RECORD": str(record), **(env or {})})
    return proc, json.loads(record.read_text()) if record.exists() else []


def test_quotes_backquotes_and_substitutions_are_data(tmp_path, recorder):
    t = tmp_path
    evil = {
        "RUN_NAME": f"x`touch {t}/pwn1`y",
        "DATA": f"it's\"; touch {t}/pwn2; echo \"$(touch {t}/pwn3)",
        "EPOCHS": f"3;touch {t}/pwn4",
        "LR": f"$(shell touch {t}/pwn5)",
    }
    proc, argv = make(t, recorder, "train-custom", *(f"{k}={v}" for k, v in evil.items()),
                      f"ARGS=--set a=`touch {t}/pwn6` --set b='c d'")
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--run-name") + 1] == evil["RUN_NAME"]
    assert argv[argv.index("--data") + 1] == evil["DATA"]
    assert argv[argv.index("--epochs") + 1] == evil["EPOCHS"]
    assert argv[argv.index("--lr") + 1] == evil["LR"]
    assert argv[-6:] == ["--set", "a=`touch", f"{t}/pwn6`", "--set", "b='c", "d'"]  # ARGS: words, never code
    assert sorted(p.name for p in t.iterdir() if p.name.startswith("pwn")) == []


def test_evaluate_and_replay_variables_are_data(tmp_path, recorder):
    t = tmp_path
    proc, argv = make(t, recorder, "evaluate", f"CHECKPOINT=a b`touch {t}/pwn1`.pt", f"OUT=o'$(touch {t}/pwn2)")
    assert proc.returncode == 0, proc.stderr
    assert argv == ["scripts/evaluate.py", "--checkpoint", f"a b`touch {t}/pwn1`.pt", "--out", f"o'$(touch {t}/pwn2)"]
    proc, argv = make(t, recorder, "replay", f"OUTPUTS=x;touch {t}/pwn3")
    assert argv == ["scripts/replay.py", "--outputs", f"x;touch {t}/pwn3"]  # the configured store: nothing to name
    # the store the user names or confirms reaches replay as data too
    proc, argv = make(t, recorder, "replay", "TO_RECORDED_URI=1", f"MLFLOW_URI=http://h'$(touch {t}/pwn4)':5000")
    assert proc.returncode == 0, proc.stderr
    assert argv == ["scripts/replay.py", "--to-recorded-uri", "--tracking-uri", f"http://h'$(touch {t}/pwn4)':5000"]
    assert not any(p.name.startswith("pwn") for p in t.iterdir())


def test_mlflow_ui_takes_the_uri_as_data_and_never_prints_its_password(tmp_path, recorder):
    t = tmp_path
    uri = f"http://bob:pw-S3cret@h`touch {t}/pwn1`:5000"
    proc, argv = make(t, recorder, "mlflow-ui", env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr
    assert argv == ["scripts/mlflow_ui.py", "--uri", uri, "--port", "5000"]
    real = subprocess.run([sys.executable, "scripts/mlflow_ui.py", "--uri", uri], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert real.returncode == 0, real.stderr
    assert "Runs go to the tracking server http://***@h" in real.stdout and "pw-S3cret" not in real.stdout + real.stderr
    proc, argv = make(t, recorder, "mlflow-ui", f"MLFLOW_URI=sqlite:///{t}/a'b$(touch {t}/pwn2).db")
    assert argv[argv.index("--uri") + 1] == f"sqlite:///{t}/a'b$(touch {t}/pwn2).db"
    assert not any(p.name.startswith("pwn") for p in t.iterdir())


def test_folds_seeds_and_the_speed_benchmark_variables_are_data(tmp_path, recorder):
    t = tmp_path
    proc, argv = make(t, recorder, "mlflow-train", f"FOLDS=5;touch {t}/pwn1", f"SEEDS=$(touch {t}/pwn2)3")
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--folds") + 1] == f"5;touch {t}/pwn1"
    assert argv[argv.index("--seeds") + 1] == f"$(touch {t}/pwn2)3"
    proc, argv = make(t, recorder, "speed-benchmark", f"SIZES=64`touch {t}/pwn3`", "REPEATS=2", "ARGS=--epochs 1")
    assert argv == ["scripts/benchmark_speed.py", "--repeats", "2", "--sizes", f"64`touch {t}/pwn3`", "--epochs", "1"]
    proc, argv = make(t, recorder, "mlflow-train")  # unset: no flag at all, the config decides
    assert "--folds" not in argv and "--seeds" not in argv
    assert not any(p.name.startswith("pwn") for p in t.iterdir())


def test_mlflow_ui_on_a_busy_port_says_which_port_to_use(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(["make", "-s", "mlflow-ui", f"PORT={port}", f"PY={sys.executable}",
                               f"MLFLOW_URI=sqlite:///{tmp_path}/mlflow.db"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert f"Port {port} on 127.0.0.1 is already in use" in proc.stderr and f"PORT={port + 1}" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_unknown_command_line_variables_are_rejected(tmp_path, recorder):
    proc, argv = make(tmp_path, recorder, "train-custom", "EPOCH=3")
    assert proc.returncode != 0 and argv == []  # nothing ran
    assert "unknown variable EPOCH" in proc.stderr and "EPOCHS" in proc.stderr


def test_experiment_tags_and_resume_reach_the_script_as_data(tmp_path, recorder):
    proc, argv = make(tmp_path, recorder, "train-custom", "EXPERIMENT=my exp`x`", "TAGS=team=rad,owner=a'b",
                      "RESUME=outputs/run 1")
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("--resume") + 1] == "outputs/run 1"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["experiment=my exp`x`", "tracking.tags.team=rad", "tracking.tags.owner=a'b"]


@pytest.mark.parametrize("var,value", [
    ("RUN_NAME", "x\ntouch {t}/pwn\ny"),  # issue 14: make ran each line as a command of its own
    ("DATA", "data\ttab"),
    ("ARGS", "--epochs 1\r"),
    ("TAGS", "team=\x1b[31mred"),
    ("EXPERIMENT", "e\x7f"),
])
def test_control_characters_in_a_variable_are_refused_before_any_recipe_runs(tmp_path, recorder, var, value):
    value = value.format(t=tmp_path)
    for ignore_errors in ([], ["-i"]):  # -i: make would go on with the next line of a split recipe
        proc, argv = make(tmp_path, recorder, *ignore_errors, "train-custom", f"{var}={value}")
        assert proc.returncode == 2 and argv == [], (proc.stdout, proc.stderr)  # the recorder never ran
        assert f"{var}: the value holds a control character" in proc.stderr and "Nothing was run" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one paragraph
    assert not (tmp_path / "pwn").exists()


def test_a_control_character_in_the_environment_is_refused_too(tmp_path, recorder):
    proc, argv = make(tmp_path, recorder, "mlflow-ui", env={"MLFLOW_TRACKING_URI": "http://h:5000\ntouch x"})
    assert proc.returncode == 2 and argv == []
    assert "MLFLOW_TRACKING_URI: the value holds a control character" in proc.stderr
    # non-ASCII text is not a control character
    proc, argv = make(tmp_path, recorder, "train-custom", "RUN_NAME=café 1")
    assert proc.returncode == 0 and argv[argv.index("--run-name") + 1] == "café 1", proc.stderr
