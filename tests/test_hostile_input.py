"""Hostile and broken input: every case ends in one clear paragraph (exit 2) or a reported skip, never a
traceback, a hang or a write outside the run's folder. docs/reliability.md lists each case by its id."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from cxrtrack.data.dataset import build_data
from cxrtrack.data.synthetic import DATASET_DIRNAME, generate_synthetic_dataset
from tests.conftest import CONFIGS, ROOT, TINY_COUNTS, assert_clean_error, run_script

QUICK = str(CONFIGS / "quick.yaml")

# id -> (extra arguments of scripts/train.py, fragment of the one-paragraph error). Each must fail before any
# work: nothing is written into output_dir.
BAD_ARGUMENTS = {
    "seed=-1": (["--set", "seed=-1"], "'seed' is -1; it must be an integer between 0 and 4294967295"),
    "seed=2^32": (["--set", "seed=4294967296"], "'seed' is 4294967296; it must be an integer"),
    "data.num_workers=-1": (["--set", "data.num_workers=-1"],
                            "'data.num_workers' is -1; it must be an integer between 0"),
    "data.decode_workers=0": (["--set", "data.decode_workers=0"], "'data.decode_workers' is 0"),
    "data.normalize_std=0": (["--set", "data.normalize_std=0"],
                             "'data.normalize_std' is 0; it must be a number between 0"),
    "data.normalize_std=.nan": (["--set", "data.normalize_std=.nan"],
                                "'data.normalize_std' is nan; it must be a number"),
    "data.image_size=100000": (["--image-size", "100000"],
                               "'data.image_size' is 100000; it must be an integer between 32 and 512"),
    "data.image_size=4096": (["--image-size", "4096"],
                             "'data.image_size' is 4096; it must be an integer between 32 and 512"),
    "data.image_size=513": (["--set", "data.image_size=513"], "between 32 and 512"),
    "data.image_size=31": (["--set", "data.image_size=31"], "between 32 and 512"),
    "data.image_size=64.5": (["--set", "data.image_size=64.5"], "must be of type integer"),
    "data.batch_size=0": (["--batch-size", "0"], "'data.batch_size' is 0"),
    "data.max_file_mb=0": (["--set", "data.max_file_mb=0"], "'data.max_file_mb' is 0"),
    "training.epochs=-3": (["--epochs", "-3"], "'training.epochs' is -3"),
    "training.lr=.inf": (["--set", "training.lr=.inf"], "'training.lr' is inf; it must be a number"),
    "training.lr=0": (["--lr", "0"], "'training.lr' is 0.0"),
    "training.momentum=1": (["--set", "training.momentum=1"], "'training.momentum' is 1"),
    "training.weight_decay=-1": (["--set", "training.weight_decay=-1"], "'training.weight_decay' is -1"),
    "training.grad_clip_norm=0": (["--set", "training.grad_clip_norm=0"], "'training.grad_clip_norm' is 0"),
    "training.grad_clip_norm=text": (["--set", "training.grad_clip_norm=lots"], "it must be of type number"),
    "data.augment.scale=[2,1]": (["--set", "data.augment.scale=[2, 1]"], "'data.augment.scale' must be [low, high]"),
    "data.augment.hflip=1.5": (["--set", "data.augment.hflip=1.5"], "'data.augment.hflip' is 1.5"),
    "model.dropout_conv=[0.1,0.2,1.0]": (["--set", "model.dropout_conv=[0.1, 0.2, 1.0]"], "list of 3 rates in [0, 1)"),
    "run_name=../../x": (["--run-name", "../../x"], "Run name '../../x' is not a plain name"),
    "run_name=/tmp/abs": (["--run-name", "/tmp/abs"], "Run name '/tmp/abs' is not a plain name"),
    "run_name=a/b": (["--run-name", "a/b"], "is not a plain name"),
    "run_name=..": (["--run-name", ".."], "Run name '..' is not a plain name"),
    "run_name=.hidden": (["--run-name", ".hidden"], "is not a plain name"),
    "run_name=spaces": (["--run-name", "my run"], "is not a plain name"),
    "run_name={a: 1}": (["--set", "run_name={a: 1}"], "'run_name' is {'a': 1}; it must be text or null"),
    "run_name=empty": (["--set", "run_name=' '"], "it must not be empty"),
    "experiment=a/b": (["--set", "experiment=team/x"], "'experiment' is 'team/x'"),
    "data.path=[1]": (["--set", "data.path=[1]"], "'data.path' is [1]; it must be text or null"),
    "tracking_uri=5": (["--set", "tracking.mlflow.tracking_uri=5"], "it must be text or null"),
    "tracking.tags nested": (["--set", "tracking.tags.team.name=x"], "Tag 'tracking.tags.team' is {'name': 'x'}"),
    "tracking.tags 6000 chars": (["--set", "tracking.tags.note=" + "x" * 6000], "at most 5,000"),
    "--set alias": (["--set", "tracking.tags={a: &x 1, b: *x}"], "uses the YAML alias '*x'"),
    "--set without =": (["--set", "training.lr"], "must look like key.subkey=value"),
    "--set unknown key": (["--set", "training.optimiser=sgd"], "Did you mean 'training.optimizer'"),
    "device=tpu": (["--set", "device=tpu"], "choose one of auto, cpu, cuda, mps"),
    "data.channels=2": (["--set", "data.channels=2"], "choose one of 1, 3"),
    "data.channels=true": (["--set", "data.channels=true"], "must be of type integer"),
    "tracker=tensorboard": (["--tracker", "tensorboard"], "Unknown tracker 'tensorboard'"),
    "model_artifact_name=a b": (["--set", "tracking.wandb.model_artifact_name=a b"],
                                "letters, digits, '-', '_' or '.'"),
}

# id -> (config file content (bytes), fragment). Written to a file passed with --config.
ALIAS_BOMB = b"extends: " + str(CONFIGS / "default.yaml").encode() + b"""
tracking:
  tags:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]
"""
EXTENDS = b"extends: " + str(CONFIGS / "default.yaml").encode() + b"\n"
BAD_CONFIG_FILES = {
    "config in invalid UTF-8": (EXTENDS + b"experiment: caf\xe9\n", "is not UTF-8 text (byte 0xe9"),
    "YAML alias bomb in tracking.tags": (ALIAS_BOMB, "uses the YAML alias '*a'"),
    "config over 1 MB": (EXTENDS + b"#" + b"x" * 1_000_001 + b"\n", "a config is at most 1,000,000"),
    "nested 10000 deep": (EXTENDS + b"experiment: " + b"[" * 10000 + b"]" * 10000 + b"\n", "nests values too deeply"),
    "top-level list": (b"- a\n- b\n", "must hold a mapping of settings at the top level"),
    "extends: 5": (b"extends: 5\n", "'extends' in"),
    "non-text setting name": (EXTENDS + b"1: x\n", "Setting names in"),
    "invalid YAML": (EXTENDS + b"training: [unclosed\n", "is not valid YAML"),
    "extends a missing file": (b"extends: nowhere.yaml\n", "nowhere.yaml does not exist"),
    "duplicated key": (EXTENDS + b"training:\n  lr: 0.001\n  epochs: 1\n  lr: 9.0\n",
                       "sets 'lr' twice in one mapping (lines 3 and 5)"),
}


def _check_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists(), "a refused input must not create the run folder"


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_one_paragraph_exit_2(case, tmp_path):
    args, fragment = BAD_ARGUMENTS[case]
    data = [] if any("data.path" in a for a in args) else ["--data", str(tmp_path / "unused")]  # --data would win
    proc = run_script("train.py", "--config", QUICK, "--tracker", "none", "--set", f"output_dir={tmp_path / 'out'}",
                      *data, *args)
    assert_clean_error(proc, fragment)
    _check_nothing_written(tmp_path)


@pytest.mark.parametrize("case", list(BAD_CONFIG_FILES))
def test_bad_config_files_are_one_paragraph_exit_2(case, tmp_path):
    content, fragment = BAD_CONFIG_FILES[case]
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    proc = run_script("train.py", "--config", str(config), "--tracker", "none",
                      "--set", f"output_dir={tmp_path / 'out'}")
    assert_clean_error(proc, fragment)
    _check_nothing_written(tmp_path)


def test_config_that_is_a_folder(tmp_path):
    assert_clean_error(run_script("train.py", "--config", str(tmp_path)), "is a folder; --config needs a YAML file")


def test_config_that_is_a_device():
    assert_clean_error(run_script("train.py", "--config", "/dev/zero"), "is not a regular file")


def test_config_that_is_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    # a child process with a deadline: a regression would block for ever on open()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(fifo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert_clean_error(proc, "is not a regular file (a pipe, socket or device)")


@pytest.mark.parametrize(("data", "fragment"), [("/", "is the root folder"), ("~", "is your home folder")])
def test_data_root_slash_is_a_clear_error(data, fragment, tmp_path, monkeypatch):
    # refused outright, whatever lies below: here a home folder holding a valid dataset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    generate_synthetic_dataset(tmp_path / "home" / "checkout" / "data", seed=1, counts=TINY_COUNTS,
                               size_range=(72, 140), n_large=0)
    proc = run_script("train.py", "--config", QUICK, "--tracker", "none", "--data", data,
                      "--set", f"output_dir={tmp_path / 'out'}")
    assert_clean_error(proc, fragment, "must point at the dataset folder itself")
    _check_nothing_written(tmp_path)


def test_data_path_that_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"png")
    proc = run_script("train.py", "--config", QUICK, "--tracker", "none", "--data", str(tmp_path / "x.png"))
    assert_clean_error(proc, "is a file; DATA= (or --data) must be a folder")


# -- the dataset --------------------------------------------------------------------------------------


def _build_with_deadline(cfg, seconds=120):
    """build_data in a thread with a deadline: a FIFO or /dev/zero read would hang or fill memory."""
    out: dict = {}

    def target():
        try:
            out["data"] = build_data(cfg, 0)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "build_data hung on a hostile file"
    if "error" in out:
        raise out["error"]
    return out["data"]


def test_hostile_dataset_entries_are_skipped_and_reported(tiny_cfg, tiny_data_root, tmp_path):
    root = Path(shutil.copytree(tiny_data_root, tmp_path / "copy"))
    normal = root / DATASET_DIRNAME / "train" / "Normal"
    good = sorted(normal.iterdir())
    os.mkfifo(normal / "zz_fifo.png")
    (normal / "zz_zero.png").symlink_to("/dev/zero")
    (normal / "zz_outside.png").symlink_to(tiny_data_root / DATASET_DIRNAME / "train" / "Normal" / good[0].name)
    (normal / "zz_folder.png").mkdir()
    (normal / "zz_loop").symlink_to("..")
    (normal / "zz_self.png").symlink_to("zz_self.png")
    Image.new("1", (10_000, 10_000)).save(normal / "zz_bomb.png")  # 100 Mpx: in Pillow's warning band
    Image.new("1", (20_000, 10_000)).save(normal / "zz_bigbomb.png")  # 200 Mpx: Pillow's own error
    (normal / "zz_big.jpeg").write_bytes(os.urandom(2 * 2**20))
    (normal / "zz_text.png").write_bytes(b"a text file renamed to .png\n" * 4)
    Image.new("I;16", (5000, 5000)).save(normal / "zz_16bit.png")  # ~40 KB, 25 Mpx: under Pillow's limit (issue 14)
    expected = {
        "zz_fifo.png": "a named pipe (FIFO), not an image file",
        "zz_zero.png": "outside the dataset folder",
        "zz_outside.png": "outside the dataset folder",
        "zz_folder.png": "a folder, not an image",
        "zz_loop": "a link to a folder that contains it (a loop)",
        "zz_self.png": "loops back on itself",
        "zz_bomb.png": "refused as a decompression bomb: 10000x10000 = 100,000,000 pixels",
        "zz_bigbomb.png": "refused as a decompression bomb",
        "zz_big.jpeg": "2.0 MB, over the limit of data.max_file_mb=1",
        "zz_text.png": "not an image Pillow can identify",
        "zz_16bit.png": "5000x5000 = 25,000,000 pixels is over the limit of 24,000,000 for data.image_size=64",
    }
    cfg = {**tiny_cfg["data"], "path": str(root), "max_file_mb": 1}
    data = _build_with_deadline(cfg)
    reasons = {s.path.name: s.reason for s in data.skipped}
    assert set(reasons) == set(expected), reasons
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert not any("object at 0x" in r or "<_io" in r for r in reasons.values())
    # every good file is still there
    counts = data.train.class_counts()["Normal"] + data.val.class_counts()["Normal"]
    assert counts == len(good)


def test_truncated_image_reason_is_readable(tiny_cfg, tiny_data_root, tmp_path):
    root = Path(shutil.copytree(tiny_data_root, tmp_path / "copy"))
    normal = root / DATASET_DIRNAME / "train" / "Normal"
    good = sorted(normal.iterdir())[0]
    (normal / f"zz_cut{good.suffix}").write_bytes(good.read_bytes()[:400])
    data = build_data({**tiny_cfg["data"], "path": str(root)}, 0)
    (skipped,) = data.skipped
    assert skipped.reason.startswith("cannot decode it (") and "0x" not in skipped.reason, skipped.reason


def test_a_file_name_with_a_newline_keeps_its_record_in_skipped_files_txt(tiny_cfg, tiny_data_root, tmp_path):
    """Issue 14: "a\\nb.png" split its line of skipped_files.txt in two; every record is one line now, escaped."""
    from cxrtrack.data.dataset import read_skipped_report, skipped_report

    root = Path(shutil.copytree(tiny_data_root, tmp_path / "copy"))
    normal = root / DATASET_DIRNAME / "train" / "Normal"
    names = ["zz_new\nline.png", "zz_tab\tfake\treason.png", "zz_back\\slash.png", os.fsdecode(b"zz_caf\xe9.png")]
    for name in names:
        (normal / name).write_bytes(b"not an image")
    data = build_data({**tiny_cfg["data"], "path": str(root)}, 0)
    assert sorted(s.path.name for s in data.skipped) == sorted(names)
    text = skipped_report(data.skipped)
    text.encode("utf-8")  # a name that is not UTF-8 is written too (escaped)
    lines = text.splitlines()
    assert lines[0].startswith("# path<TAB>reason") and len(lines) == 1 + len(names), lines
    assert all(line.count("\t") == 1 for line in lines[1:]), lines
    assert any(line.endswith("/Normal/zz_new\\nline.png\tnot an image Pillow can identify (another format, or damaged)")
               for line in lines), lines
    assert read_skipped_report(text) == data.skipped


@pytest.mark.slow
def test_evaluate_writes_where_the_user_says_or_under_outputs_never_where_a_checkpoint_says(tiny_cfg, tmp_path):
    import torch

    from cxrtrack.training.run import run_experiment

    tiny_cfg["training"]["epochs"] = 1
    result = run_experiment(tiny_cfg)
    checkpoint = tmp_path / "altered.pt"
    state = torch.load(result.fit.checkpoint, weights_only=True)
    state["config"]["output_dir"] = str(tmp_path / "elsewhere")  # where a hostile checkpoint would write
    state["run_name"] = "../../escape"
    torch.save(state, checkpoint)
    work = tmp_path / "project"
    work.mkdir()
    proc = run_script("evaluate.py", "--checkpoint", str(checkpoint), cwd=work)  # in this process, from work/
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "escape").exists()
    # the name is cleaned, kept under outputs/ (and suffixed with the evaluated data's fingerprint)
    assert [p.name for p in (work / "outputs").glob("eval-escape-*/test_metrics.json")] == ["test_metrics.json"]


def test_the_reliability_doc_lists_every_case_and_names_only_real_tests():
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text()
    for case in [*BAD_ARGUMENTS, *BAD_CONFIG_FILES]:
        assert f"[`{case}`]" in doc, case
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py")), re.M))
    files = {p.stem for p in (ROOT / "tests").glob("test_*.py")}  # the doc names test files too
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b", doc)) - files
    assert named and named <= defined, named - defined
