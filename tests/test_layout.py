"""Tests for finding the dataset on disk and naming its classes (cxrtrack.data.layout).

Each test builds a tiny tree (two 8x8 PNGs per class folder) in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrtrack import CLASS_NAMES
from cxrtrack.data import layout
from cxrtrack.data.layout import DatasetLocation, canonical_class, class_folders, locate_dataset
from cxrtrack.errors import DataError

KAGGLE_CLASS_DIRS = ("Covid", "Normal", "Viral Pneumonia")


def make_class_dirs(split_dir: Path, names=KAGGLE_CLASS_DIRS, n_files: int = 2) -> Path:
    """split_dir/<name>/img_<i>.png for every name; returns split_dir."""
    for name in names:
        folder = split_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_files):
            Image.fromarray(np.full((8, 8), 40 * (i + 1), np.uint8)).save(folder / f"img_{i}.png")
    return split_dir


def make_train_test(folder: Path, train="train", test="test", names=KAGGLE_CLASS_DIRS) -> Path:
    make_class_dirs(folder / train, names)
    make_class_dirs(folder / test, names)
    return folder


# ---------------------------------------------------------------------------------------------
# canonical_class
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder_name", "expected"),
    [
        ("Covid", "COVID-19"),
        ("COVID-19", "COVID-19"),
        ("covid19", "COVID-19"),
        ("COVID", "COVID-19"),
        ("Normal", "Normal"),
        ("NORMAL", "Normal"),
        ("normal", "Normal"),
        ("Viral Pneumonia", "Viral Pneumonia"),
        ("Viral_Pneumonia", "Viral Pneumonia"),
        ("viral-pneumonia", "Viral Pneumonia"),
        ("viral pneumonia", "Viral Pneumonia"),
        ("VIRAL PNEUMONIA", "Viral Pneumonia"),
    ],
)
def test_canonical_class_maps_spellings(folder_name, expected):
    assert canonical_class(folder_name) == expected
    assert expected in CLASS_NAMES


@pytest.mark.parametrize(
    "folder_name", ["Pneumonia", "Bacterial Pneumonia", "Lung_Opacity", "train", "test", "other", ""]
)
def test_canonical_class_unknown_is_none(folder_name):
    assert canonical_class(folder_name) is None


# ---------------------------------------------------------------------------------------------
# locate_dataset: accepted layouts
# ---------------------------------------------------------------------------------------------


def test_kagglehub_download_folder(tmp_path):
    dataset = make_train_test(tmp_path / "versions" / "2" / "Covid19-dataset")
    expected = DatasetLocation(dataset, dataset / "train", dataset / "test", "train-test")
    assert locate_dataset(tmp_path) == expected  # the kagglehub cache root
    assert locate_dataset(tmp_path / "versions" / "2") == expected  # the path kagglehub returns


def test_covid19_dataset_folder_itself(tmp_path):
    dataset = make_train_test(tmp_path / "Covid19-dataset")
    assert locate_dataset(dataset) == DatasetLocation(
        dataset, dataset / "train", dataset / "test", "train-test"
    )


def test_locate_accepts_str_path(tmp_path):
    dataset = make_train_test(tmp_path / "Covid19-dataset")
    assert locate_dataset(str(dataset)).root == dataset


def test_train_test_folder_with_case_and_name_variations(tmp_path):
    names = ("COVID-19", "normal", "viral_pneumonia")
    root = make_train_test(tmp_path / "my data", train="Train", test="TEST", names=names)
    loc = locate_dataset(root)
    assert loc == DatasetLocation(root, root / "Train", root / "TEST", "train-test")
    for split_dir in (loc.train_dir, loc.test_dir):
        assert class_folders(split_dir) == {
            "COVID-19": split_dir / "COVID-19",
            "Normal": split_dir / "normal",
            "Viral Pneumonia": split_dir / "viral_pneumonia",
        }


def test_flat_folder_of_class_folders(tmp_path):
    root = make_class_dirs(tmp_path / "flat")
    loc = locate_dataset(root)
    assert loc.layout == "flat"
    assert loc.test_dir is None
    assert loc.root == root and loc.train_dir == root
    assert set(class_folders(loc.train_dir)) == set(CLASS_NAMES)


def test_train_without_test_is_flat(tmp_path):
    root = tmp_path / "only-train"
    make_class_dirs(root / "train")
    loc = locate_dataset(root)
    assert loc == DatasetLocation(root, root / "train", None, "flat")


def test_hidden_and_macos_folders_are_ignored(tmp_path):
    root = tmp_path / "download"
    # Decoys that sort before the real data and would match at the same depth if they were searched.
    make_class_dirs(root / ".ipynb_checkpoints")
    make_train_test(root / "__MACOSX")
    dataset = make_train_test(root / "data")
    # Decoys inside the splits would be "unknown class folders" if they were not ignored.
    for split in ("train", "test"):
        (dataset / split / ".ipynb_checkpoints").mkdir()
        (dataset / split / "__MACOSX" / "Covid").mkdir(parents=True)

    loc = locate_dataset(root)
    assert loc == DatasetLocation(dataset, dataset / "train", dataset / "test", "train-test")
    for split_dir in (loc.train_dir, loc.test_dir):
        assert class_folders(split_dir) == {
            "COVID-19": split_dir / "Covid",
            "Normal": split_dir / "Normal",
            "Viral Pneumonia": split_dir / "Viral Pneumonia",
        }


def test_search_goes_only_as_deep_as_the_documented_layouts(tmp_path):
    # the deepest documented layout is the kagglehub cache root: versions/2/Covid19-dataset/train (3 levels down)
    make_train_test(tmp_path / "a" / "versions" / "2" / "Covid19-dataset")  # one level deeper: not searched
    with pytest.raises(DataError, match="No chest X-ray dataset found") as info:
        locate_dataset(tmp_path)
    assert "3 folder levels" in str(info.value)
    assert locate_dataset(tmp_path / "a").root == tmp_path / "a" / "versions" / "2" / "Covid19-dataset"


@pytest.mark.parametrize("where", ["/", "~", "home"])
def test_the_root_and_home_folders_are_refused_without_being_searched(where, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    make_train_test(home / "Covid19-dataset")  # what a search of the home folder would find
    listed = []
    monkeypatch.setattr(layout, "_visible_dirs", lambda folder: listed.append(folder) or [])
    with pytest.raises(DataError) as info:
        locate_dataset(home if where == "home" else where)
    assert listed == []  # refused before looking inside: the answer does not depend on what lies there
    message = str(info.value)
    assert ("the root folder" if where == "/" else "your home folder") in message
    assert "must point at the dataset folder itself" in message and "DATA=" in message and "make download" in message
    assert "\n" not in message


@pytest.mark.parametrize(("shallow", "deep"), [("a", "b/x"), ("b", "a/x")])
def test_shallowest_match_wins(tmp_path, shallow, deep):
    make_train_test(tmp_path / deep)
    make_train_test(tmp_path / shallow)
    assert locate_dataset(tmp_path).root == tmp_path / shallow


# ---------------------------------------------------------------------------------------------
# errors: DataError with a message naming the path and the fix
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError) as info:
        locate_dataset(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "make download" in message and "DATA" in message


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "images.zip"
    file.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError) as info:
        locate_dataset(file)
    message = str(info.value)
    assert str(file) in message
    assert "is a file" in message and "must be a folder" in message


@pytest.mark.parametrize("contents", ["empty", "unrelated"])
def test_folder_without_dataset(tmp_path, contents):
    root = tmp_path / "somewhere"
    root.mkdir()
    if contents == "unrelated":
        make_class_dirs(root / "photos", names=("cats", "dogs"))
        (root / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        locate_dataset(root)
    message = str(info.value)
    assert str(root) in message
    assert "No chest X-ray dataset found" in message
    assert "train/" in message and "test/" in message
    assert all(name in message for name in CLASS_NAMES)
    assert "make download" in message


def test_split_missing_a_class_folder(tmp_path):
    split = make_class_dirs(tmp_path / "test", names=("Covid", "Normal"))  # no Viral Pneumonia
    with pytest.raises(DataError) as info:
        class_folders(split)
    message = str(info.value)
    assert str(split) in message
    assert "'Viral Pneumonia'" in message
    assert "one folder per class" in message


def test_locate_then_class_folders_reports_a_split_missing_a_class(tmp_path):
    root = tmp_path / "ds"
    make_class_dirs(root / "train")
    make_class_dirs(root / "test", names=("Covid", "Viral Pneumonia"))
    loc = locate_dataset(root)  # the layout itself is found...
    assert loc.layout == "train-test"
    with pytest.raises(DataError, match="'Normal'") as info:  # ...and the incomplete split is named
        class_folders(loc.test_dir)
    assert str(root / "test") in str(info.value)


def test_unknown_extra_class_folder(tmp_path):
    split = make_class_dirs(tmp_path / "train", names=(*KAGGLE_CLASS_DIRS, "Lung_Opacity"))
    with pytest.raises(DataError) as info:
        class_folders(split)
    message = str(info.value)
    assert str(split) in message
    assert "'Lung_Opacity'" in message
    assert "Rename or remove" in message
    assert all(name in message for name in CLASS_NAMES)


def test_two_folders_for_the_same_class(tmp_path):
    split = make_class_dirs(tmp_path / "train", names=("Covid", "COVID-19", "Normal", "Viral Pneumonia"))
    with pytest.raises(DataError) as info:
        class_folders(split)
    message = str(info.value)
    assert "'Covid'" in message and "'COVID-19'" in message
    assert str(split) in message
    assert "Merge" in message


def test_a_data_link_that_loops_or_dangles_says_so(tmp_path):
    """DATA= pointing at a link loop used to be reported as "does not exist", which sends the user looking for a
    missing folder; a loop and a dangling link are named as what they are."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(DataError, match="is a link that loops"):
        locate_dataset(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=r"is a link whose target does not exist \(.*gone\)"):
        locate_dataset(tmp_path / "dangling")
    with pytest.raises(DataError, match="does not exist. Point DATA="):
        locate_dataset(tmp_path / "missing")
