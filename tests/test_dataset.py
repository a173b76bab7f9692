"""Tests for the cached dataset (cxrtrack.data.dataset): scanning, decoding once, splitting, skipping
unreadable files, fingerprinting, transforms and choosing the data folder.

Uses the session-wide tiny synthetic set from conftest (``tiny_data_root``, Kaggle layout, 38 files).
Tests that change files work on a copy in tmp_path; the shared tree is never modified.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cxrtrack.data.dataset as dataset_mod
import cxrtrack.data.images as images_mod
from cxrtrack import CLASS_NAMES
from cxrtrack.data.dataset import (
    build_data,
    decode_files,
    detect_source,
    fingerprint_of,
    list_files,
    resolve_data_path,
    slug,
)
from cxrtrack.data.layout import canonical_class, locate_dataset
from cxrtrack.data.synthetic import DATASET_DIRNAME, SYNTHETIC_MARKER
from cxrtrack.data.transforms import build_transforms
from cxrtrack.errors import DataError

from .conftest import TINY_COUNTS

SIZE = 64  # tiny_cfg["data"]["image_size"]
CLASS_DIR = {"COVID-19": "Covid", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}
N_TRAIN_FILES = sum(TINY_COUNTS["train"].values())
N_TEST_FILES = sum(TINY_COUNTS["test"].values())


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def data_cfg(tiny_cfg, **overrides) -> dict:
    """A copy of the tiny ``data`` section with some keys replaced (paths given as Path are stringified)."""
    return {**tiny_cfg["data"], **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}}


def copy_root(tiny_data_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny set (marker included); returns the copy's root."""
    return Path(shutil.copytree(tiny_data_root, tmp_path / "copy"))


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}


def split_paths(data) -> dict[str, list[Path]]:
    return {name: list(getattr(data, name).split.paths) for name in ("train", "val", "test")}


@pytest.fixture
def tiny_data(tiny_cfg):
    return build_data(tiny_cfg["data"], tiny_cfg["seed"])


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def test_build_data_on_tiny_set_splits_correctly(tiny_data, tiny_data_root):
    data = tiny_data
    dataset_dir = tiny_data_root / DATASET_DIRNAME
    assert data.class_names == CLASS_NAMES == ("COVID-19", "Normal", "Viral Pneumonia")
    assert data.source == "synthetic"
    assert data.test_split == "official"
    assert data.location.layout == "train-test"
    assert data.image_size == SIZE
    assert data.skipped == []

    paths = split_paths(data)
    # the test split is exactly the official test/ files, and only those
    assert set(paths["test"]) == files_under(dataset_dir / "test")
    assert all(p.is_relative_to(dataset_dir / "test") for p in paths["test"])
    # train + val are exactly the official train/ files
    assert set(paths["train"]) | set(paths["val"]) == files_under(dataset_dir / "train")
    assert all(p.is_relative_to(dataset_dir / "train") for p in paths["train"] + paths["val"])
    # no file is in two splits
    assert not set(paths["train"]) & set(paths["val"])
    assert not set(paths["train"]) & set(paths["test"])
    assert not set(paths["val"]) & set(paths["test"])
    assert len(set(paths["train"])) == len(paths["train"])

    # the label of every image is its class folder, in the fixed class order
    for name in ("train", "val", "test"):
        ds = getattr(data, name)
        for path, label in zip(ds.split.paths, ds.labels, strict=True):
            assert canonical_class(path.parent.name) == CLASS_NAMES[label]
        assert len(ds) == len(ds.split.images) == len(ds.labels)


def assert_stratified(counts: dict[str, int], fraction: float) -> None:
    """Every class present, each holding about ``fraction`` of its train/ images."""
    assert all(n >= 1 for n in counts.values()), counts
    for name, n in counts.items():
        assert abs(n - TINY_COUNTS["train"][CLASS_DIR[name]] * fraction) <= 1, counts


def test_val_split_is_stratified_and_seeded(tiny_cfg):
    # 4 of 25 images: a plain random split misses a class about half the time, so 8 seeds catch it
    for seed in range(8):
        assert_stratified(
            build_data(tiny_cfg["data"], seed=seed).val.class_counts(), tiny_cfg["data"]["val_fraction"]
        )

    a = build_data(tiny_cfg["data"], seed=1)
    b = build_data(tiny_cfg["data"], seed=1)
    c = build_data(tiny_cfg["data"], seed=2)

    assert split_paths(a)["val"] == split_paths(b)["val"]  # same seed: same split, same order
    assert split_paths(a)["train"] == split_paths(b)["train"]
    assert set(split_paths(a)["val"]) != set(split_paths(c)["val"])  # another seed: another split
    assert split_paths(a)["test"] == split_paths(c)["test"]  # the official test split never moves


def test_summary_counts_add_up(tiny_data):
    s = tiny_data.summary()
    assert s["source"] == "synthetic" and s["test_split"] == "official" and s["layout"] == "train-test"
    assert s["n_skipped"] == 0
    assert s["fingerprint"] == tiny_data.fingerprint
    assert s["n_train"] + s["n_val"] + s["n_test"] == N_TRAIN_FILES + N_TEST_FILES
    assert s["n_test"] == N_TEST_FILES
    for split in ("train", "val", "test"):
        assert (
            sum(s[f"n_{split}_{slug(c)}"] for c in CLASS_NAMES)
            == s[f"n_{split}"]
            == len(getattr(tiny_data, split))
        )
    for c in CLASS_NAMES:
        assert s[f"n_train_{slug(c)}"] + s[f"n_val_{slug(c)}"] == TINY_COUNTS["train"][CLASS_DIR[c]]
        assert s[f"n_test_{slug(c)}"] == TINY_COUNTS["test"][CLASS_DIR[c]]


def test_slug_is_metric_key_safe():
    assert [slug(c) for c in CLASS_NAMES] == ["covid19", "normal", "viral_pneumonia"]


def test_cache_memory_is_n_times_size_squared(tiny_data):
    n = len(tiny_data.train) + len(tiny_data.val) + len(tiny_data.test)
    assert n == N_TRAIN_FILES + N_TEST_FILES
    assert tiny_data.cache_bytes == n * SIZE * SIZE
    for name in ("train", "val", "test"):
        images = getattr(tiny_data, name).split.images
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (1, SIZE, SIZE)
    assert tiny_data.summary()["cache_mb"] == round(n * SIZE * SIZE / 2**20, 2)


def test_list_files_sorted_labelled_and_skips_hidden_files(tmp_path, tiny_data_root):
    root = copy_root(tiny_data_root, tmp_path)
    train = root / DATASET_DIRNAME / "train"
    (train / "Normal" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "Covid" / ".ipynb_checkpoints").mkdir()
    files = list_files(train)
    assert len(files) == N_TRAIN_FILES
    assert all(not p.name.startswith(".") and p.is_file() for p, _ in files)
    for label, name in enumerate(CLASS_NAMES):
        of_class = [p for p, lab in files if lab == label]
        assert of_class == sorted(train / CLASS_DIR[name] / p.name for p in of_class)
        assert len(of_class) == TINY_COUNTS["train"][CLASS_DIR[name]]


# ---------------------------------------------------------------------------------------------
# fingerprint and source
# ---------------------------------------------------------------------------------------------


def test_fingerprint_stable_and_content_sensitive(tiny_cfg, tiny_data_root, tmp_path):
    root = copy_root(tiny_data_root, tmp_path)
    cfg = data_cfg(tiny_cfg, path=root)
    first = build_data(cfg, seed=0).fingerprint
    assert build_data(cfg, seed=0).fingerprint == first  # stable
    assert build_data(cfg, seed=5).fingerprint == first  # the seed is not content
    assert (
        build_data(tiny_cfg["data"], seed=0).fingerprint == first
    )  # location-independent: same files elsewhere

    victim = sorted((root / DATASET_DIRNAME / "test" / "Normal").iterdir())[0]
    original = victim.read_bytes()
    arr = np.array(Image.open(victim).convert("L"))
    arr[0, 0] ^= 0xFF  # one pixel changes: still a valid image
    Image.fromarray(arr).save(victim, format=Image.open(victim).format)
    assert victim.read_bytes() != original
    changed = build_data(cfg, seed=0).fingerprint
    assert changed != first

    victim.rename(victim.with_name("renamed" + victim.suffix))  # the relative path is part of it too
    assert build_data(cfg, seed=0).fingerprint not in (first, changed)


def test_fingerprint_of_ignores_dict_order():
    a = {"train/Covid/a.png": "01", "test/Normal/b.jpg": "02"}
    b = dict(reversed(list(a.items())))
    assert fingerprint_of(a) == fingerprint_of(b)
    assert fingerprint_of(a) != fingerprint_of({**a, "test/Normal/b.jpg": "03"})
    assert len(fingerprint_of(a)) == 16


def test_detect_source_kaggle_and_local(tiny_data_root, tmp_path):
    root = copy_root(tiny_data_root, tmp_path)
    loc = locate_dataset(root)
    assert detect_source(loc, root) == "synthetic"
    (root / SYNTHETIC_MARKER).unlink()
    assert detect_source(loc, root) == "kaggle"  # Covid19-dataset/ without the synthetic marker
    renamed = (root / DATASET_DIRNAME).rename(root / "my-xrays")
    assert detect_source(locate_dataset(renamed), renamed) == "local"


# ---------------------------------------------------------------------------------------------
# each file is decoded once per run
# ---------------------------------------------------------------------------------------------


def test_every_file_decoded_exactly_once_during_build(tiny_cfg, monkeypatch):
    calls: list[bytes] = []
    lock = threading.Lock()
    real_decode = images_mod.decode_image

    def counting_decode(data, size):
        with lock:
            calls.append(data)
        return real_decode(data, size)

    monkeypatch.setattr(dataset_mod, "decode_image", counting_decode)
    data = build_data(tiny_cfg["data"], tiny_cfg["seed"])
    assert len(calls) == N_TRAIN_FILES + N_TEST_FILES
    assert len(set(calls)) == len(calls)  # no file twice (every synthetic file's bytes are distinct)
    assert len(data.train) + len(data.val) + len(data.test) == len(calls)


def test_training_epochs_never_decode_or_read_again(tiny_data, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the disk / decoder was used after build_data")

    monkeypatch.setattr(dataset_mod, "decode_image", boom)
    monkeypatch.setattr(images_mod, "decode_image", boom)
    monkeypatch.setattr(Image, "open", boom)
    monkeypatch.setattr(pathlib.Path, "read_bytes", boom)

    loaders = tiny_data.loaders(batch_size=8, seed=0)
    for _epoch in range(2):
        seen = 0
        for images, labels in loaders["train"]:
            assert images.dtype == torch.float32 and tuple(images.shape[1:]) == (1, SIZE, SIZE)
            assert labels.dtype == torch.int64
            seen += len(labels)
        assert seen == len(tiny_data.train)
    assert sum(len(y) for _, y in loaders["val"]) == len(tiny_data.val)
    assert sum(len(y) for _, y in loaders["test"]) == len(tiny_data.test)


def test_decode_files_records_digests_for_every_file(tiny_data_root):
    dataset_dir = tiny_data_root / DATASET_DIRNAME
    files = list_files(dataset_dir / "test")
    split = decode_files(files, SIZE, dataset_dir, workers=2)
    assert split.paths == [p for p, _ in files]  # input order kept despite the thread pool
    assert split.labels == [lab for _, lab in files]
    assert set(split.digests) == {p.relative_to(dataset_dir).as_posix() for p, _ in files}
    assert all(k.startswith("test/") for k in split.digests)


# ---------------------------------------------------------------------------------------------
# unreadable files: skipped and reported, never replaced
# ---------------------------------------------------------------------------------------------


def add_corrupt_files(folder: Path) -> set[Path]:
    good_jpeg = next(p for p in sorted(folder.iterdir()) if p.suffix in (".jpeg", ".jpg"))
    data = good_jpeg.read_bytes()
    bad = {
        folder / "zz_empty.jpeg": b"",
        folder / "zz_truncated.jpeg": data[: len(data) // 2],
        folder / "zz_notes.png": b"this is a text file, renamed to .png\n" * 5,
    }
    for path, content in bad.items():
        path.write_bytes(content)
    return set(bad)


def test_corrupt_files_are_skipped_and_reported_by_path(tiny_cfg, tiny_data_root, tmp_path, caplog):
    root = copy_root(tiny_data_root, tmp_path)
    bad = add_corrupt_files(root / DATASET_DIRNAME / "train" / "Normal")

    with caplog.at_level(logging.WARNING, logger="cxrtrack.data.dataset"):
        data = build_data(data_cfg(tiny_cfg, path=root), tiny_cfg["seed"])

    assert {s.path for s in data.skipped} == bad
    assert len(data.skipped) == 3
    assert all(s.reason for s in data.skipped)
    assert data.summary()["n_skipped"] == 3
    for path in bad:  # every skipped file is named in the log
        assert str(path) in caplog.text

    # never replaced: the datasets hold exactly the good files
    paths = split_paths(data)
    assert not bad & (set(paths["train"]) | set(paths["val"]) | set(paths["test"]))
    assert len(data.train) + len(data.val) == N_TRAIN_FILES
    assert len(data.test) == N_TEST_FILES
    assert (
        data.train.class_counts()["Normal"] + data.val.class_counts()["Normal"]
        == TINY_COUNTS["train"]["Normal"]
    )

    # and no blank stand-in image in the cache
    for name in ("train", "val", "test"):
        images = getattr(data, name).split.images.float()
        assert (images.amax(dim=(1, 2, 3)) > 0).all(), name
        assert (images.flatten(1).std(dim=1) > 1).all(), name


@pytest.mark.parametrize("how", ["removed", "all_corrupt"])
def test_class_without_readable_images_is_an_error(tiny_cfg, tiny_data_root, tmp_path, how):
    root = copy_root(tiny_data_root, tmp_path)
    folder = root / DATASET_DIRNAME / "test" / "Viral Pneumonia"
    for path in folder.iterdir():
        if how == "removed":
            path.unlink()
        else:
            path.write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        build_data(data_cfg(tiny_cfg, path=root), tiny_cfg["seed"])
    message = str(info.value)
    assert "'Viral Pneumonia'" in message
    assert str(root / DATASET_DIRNAME / "test") in message
    assert "'COVID-19'" not in message and "'Normal'" not in message
    if how == "all_corrupt":
        assert f"{TINY_COUNTS['test']['Viral Pneumonia']} file(s) could not be decoded" in message


def test_empty_train_class_is_an_error(tiny_cfg, tiny_data_root, tmp_path):
    root = copy_root(tiny_data_root, tmp_path)
    for path in (root / DATASET_DIRNAME / "train" / "Normal").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="'Normal'"):
        build_data(data_cfg(tiny_cfg, path=root), tiny_cfg["seed"])


# ---------------------------------------------------------------------------------------------
# flat layout: a stratified test split is carved out
# ---------------------------------------------------------------------------------------------


def test_flat_layout_gets_a_carved_stratified_test_split(tiny_cfg, tiny_data_root, tmp_path):
    flat = Path(shutil.copytree(tiny_data_root / DATASET_DIRNAME / "train", tmp_path / "flat"))
    cfg = data_cfg(tiny_cfg, path=flat)
    data = build_data(cfg, seed=0)

    assert data.test_split == "carved"
    assert data.location.layout == "flat" and data.location.test_dir is None
    assert data.source == "local"
    assert data.summary()["test_split"] == "carved"

    paths = split_paths(data)
    all_paths = set(paths["train"]) | set(paths["val"]) | set(paths["test"])
    assert all_paths == files_under(flat)
    assert len(all_paths) == len(paths["train"]) + len(paths["val"]) + len(paths["test"])  # disjoint

    for seed in range(6):
        carved = data if seed == 0 else build_data(cfg, seed=seed)
        assert_stratified(carved.test.class_counts(), cfg["test_fraction"])
        assert all(n >= 1 for n in carved.val.class_counts().values())

    assert split_paths(build_data(cfg, seed=0))["test"] == paths["test"]  # seeded
    assert split_paths(build_data(cfg, seed=1))["test"] != paths["test"]


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------


def test_train_transform_output_is_normalised_float(tiny_data, tiny_cfg):
    cfg = tiny_cfg["data"]
    torch.manual_seed(0)
    image, label = tiny_data.train[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (1, SIZE, SIZE)
    assert isinstance(label, int)
    lo = (0 - cfg["normalize_mean"]) / cfg["normalize_std"]
    hi = (1 - cfg["normalize_mean"]) / cfg["normalize_std"]
    assert lo - 1e-5 <= image.min() and image.max() <= hi + 1e-5
    assert image.min() < 0 < image.max()  # centred, not left in [0, 1] or [0, 255]

    train_tf, _ = build_transforms(cfg)
    raw = tiny_data.train.split.images[0]
    outs = [train_tf(raw) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # augmentation is on for train


def test_eval_transform_is_exact_and_deterministic(tiny_data, tiny_cfg):
    cfg = tiny_cfg["data"]
    raw = tiny_data.test.split.images[0]
    first, _ = tiny_data.test[0]
    second, _ = tiny_data.test[0]
    assert torch.equal(first, second)
    expected = (raw.float() / 255 - cfg["normalize_mean"]) / cfg["normalize_std"]
    assert torch.allclose(first, expected, atol=1e-5)
    val_raw = tiny_data.val.split.images[0]
    val_first, _ = tiny_data.val[0]
    assert torch.equal(val_first, tiny_data.val[0][0])  # validation is not augmented either
    assert torch.allclose(
        val_first, (val_raw.float() / 255 - cfg["normalize_mean"]) / cfg["normalize_std"], atol=1e-5
    )


def test_three_channels_are_identical_copies(tiny_cfg, tiny_data):
    train_tf, eval_tf = build_transforms({**tiny_cfg["data"], "channels": 3})
    raw = tiny_data.test.split.images[0]
    for tf in (train_tf, eval_tf):
        out = tf(raw)
        assert out.dtype == torch.float32 and tuple(out.shape) == (3, SIZE, SIZE)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    one_channel = build_transforms(tiny_cfg["data"])[1](raw)
    assert torch.allclose(eval_tf(raw)[0], one_channel[0], atol=1e-5)


def test_augmentation_disabled_makes_train_transform_deterministic(tiny_cfg, tiny_data):
    cfg = {**tiny_cfg["data"], "augment": {**tiny_cfg["data"]["augment"], "enabled": False}}
    train_tf, eval_tf = build_transforms(cfg)
    raw = tiny_data.train.split.images[0]
    assert torch.equal(train_tf(raw), eval_tf(raw))


# ---------------------------------------------------------------------------------------------
# resolve_data_path
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_generator(monkeypatch):
    """Replace the (slow) full synthetic generation; record every call."""
    calls = []

    def fake(root, *, seed=0, **kw):
        calls.append({"root": Path(root), "seed": seed, **kw})
        return Path(root) / DATASET_DIRNAME

    monkeypatch.setattr(dataset_mod, "ensure_synthetic_dataset", fake)
    return calls


def test_no_path_and_no_download_generates_the_synthetic_set(tiny_cfg, tmp_path, fake_generator):
    cfg = data_cfg(
        tiny_cfg,
        path=None,
        download_dir=tmp_path / "kaggle",
        synthetic_dir=tmp_path / "synthetic",
        synthetic_seed=7,
    )
    assert resolve_data_path(cfg) == tmp_path / "synthetic"
    assert fake_generator == [{"root": tmp_path / "synthetic", "seed": 7}]


def test_valid_download_dir_is_used_without_generating(tiny_cfg, tiny_data_root, tmp_path, fake_generator):
    download = Path(
        shutil.copytree(tiny_data_root / DATASET_DIRNAME, tmp_path / "kaggle" / DATASET_DIRNAME)
    ).parent
    cfg = data_cfg(tiny_cfg, path=None, download_dir=download, synthetic_dir=tmp_path / "synthetic")
    assert resolve_data_path(cfg) == download
    assert fake_generator == []

    data = build_data(cfg, seed=0)
    assert data.source == "kaggle"  # Covid19-dataset/ without the synthetic marker
    assert data.location.root == download / DATASET_DIRNAME
    assert fake_generator == []


def test_incomplete_download_dir_falls_back_to_synthetic(tiny_cfg, tmp_path, fake_generator):
    (tmp_path / "kaggle" / "partial").mkdir(parents=True)
    cfg = data_cfg(
        tiny_cfg, path=None, download_dir=tmp_path / "kaggle", synthetic_dir=tmp_path / "synthetic"
    )
    assert resolve_data_path(cfg) == tmp_path / "synthetic"
    assert [c["root"] for c in fake_generator] == [tmp_path / "synthetic"]


def test_explicit_path_wins(tiny_cfg, tmp_path, fake_generator):
    cfg = data_cfg(tiny_cfg, path=tmp_path / "mine", download_dir=tmp_path / "kaggle")
    assert resolve_data_path(cfg) == tmp_path / "mine"
    assert fake_generator == []


def test_build_data_without_path_uses_generated_set(tiny_cfg, tiny_data_root, tmp_path, monkeypatch):
    calls = []

    def fake(root, *, seed=0, **kw):  # "generate" by copying the tiny set (marker included)
        calls.append(Path(root))
        shutil.copytree(tiny_data_root, root)
        return Path(root) / DATASET_DIRNAME

    monkeypatch.setattr(dataset_mod, "ensure_synthetic_dataset", fake)
    cfg = data_cfg(
        tiny_cfg, path=None, download_dir=tmp_path / "kaggle", synthetic_dir=tmp_path / "synthetic"
    )
    data = build_data(cfg, seed=0)
    assert calls == [tmp_path / "synthetic"]
    assert data.source == "synthetic"
    assert data.location.root == tmp_path / "synthetic" / DATASET_DIRNAME
    assert len(data.train) + len(data.val) + len(data.test) == N_TRAIN_FILES + N_TEST_FILES


def test_a_file_that_cannot_be_read_is_skipped_and_reported(tiny_cfg, tiny_data_root, tmp_path):
    """A broken symlink (or any OSError on read) is skipped and named, like a corrupt image."""
    root = copy_root(tiny_data_root, tmp_path)
    link = root / "Covid19-dataset" / "train" / "Normal" / "dangling.jpeg"
    link.symlink_to(tmp_path / "gone.jpeg")
    data = build_data(data_cfg(tiny_cfg, path=str(root)), seed=0)
    assert [s.path for s in data.skipped] == [link]
    assert "cannot read the file" in data.skipped[0].reason
    assert data.summary()["n_skipped"] == 1
