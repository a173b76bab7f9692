"""Finding the dataset on disk, whatever the user points at, and naming its classes.

Accepted layouts (class folder names are matched case-insensitively, see :func:`canonical_class`):

- the kagglehub download folder (``.../versions/2`` holding ``Covid19-dataset/``),
- ``Covid19-dataset/`` itself, or any folder holding ``train/`` and ``test/`` class folders,
- a flat folder of class folders (no official test split: one is carved out, and the run says so).

The search goes only as deep as these layouts need (the kagglehub cache root ``<handle>/versions/2/Covid19-dataset/``
is 3 levels), and the root and home folders are refused before anything is listed, so what happens to lie near
them never decides what is trained on.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cxrtrack import CLASS_NAMES
from cxrtrack.errors import DataError

# Normalised folder name (lower case, letters and digits only) -> canonical class name.
_ALIASES = {
    "covid": "COVID-19",
    "covid19": "COVID-19",
    "covid2019": "COVID-19",
    "normal": "Normal",
    "viralpneumonia": "Viral Pneumonia",
    "pneumoniaviral": "Viral Pneumonia",
}
_MAX_SEARCH_DEPTH = 3  # the deepest accepted layout: the kagglehub cache root -> versions/2/Covid19-dataset/
_MAX_FOLDERS_SEARCHED = 2000  # a large tree (a disk, a projects folder) ends in a clear error, not a long walk


def canonical_class(folder_name: str) -> str | None:
    """``"Viral_Pneumonia"`` -> ``"Viral Pneumonia"``, ``"covid19"`` -> ``"COVID-19"``; None if unknown."""
    key = re.sub(r"[^a-z0-9]", "", folder_name.lower())
    return _ALIASES.get(key)


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-folders of ``path`` (hidden and ``__*`` ones left out); a folder we may not read has none."""
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith((".", "__")) and p.is_dir())
    except OSError:  # permission denied, vanished, not a folder after all (/proc, a racing delete)
        return []


def _child(path: Path, name: str) -> Path | None:
    """The sub-folder of ``path`` called ``name``, ignoring case."""
    for sub in _visible_dirs(path):
        if sub.name.lower() == name:
            return sub
    return None


def class_folders(split_dir: Path) -> dict[str, Path]:
    """Map canonical class name -> folder inside one split; a clear error for anything unexpected."""
    found: dict[str, Path] = {}
    unknown = []
    for sub in _visible_dirs(split_dir):
        name = canonical_class(sub.name)
        if name is None:
            unknown.append(sub.name)
        elif name in found:
            raise DataError(
                f"Both '{found[name].name}' and '{sub.name}' in {split_dir} name the class {name!r}. "
                f"Merge them into one folder."
            )
        else:
            found[name] = sub
    if unknown:
        raise DataError(
            f"Folder {split_dir} holds class folders we do not recognise: {', '.join(map(repr, unknown))}. "
            f"Expected one folder per class: {', '.join(CLASS_NAMES)} (names are matched ignoring case, "
            f"spaces, '-' and '_', e.g. 'Covid', 'Viral_Pneumonia'). Rename or remove the others."
        )
    missing = [c for c in CLASS_NAMES if c not in found]
    if missing:
        raise DataError(
            f"Folder {split_dir} has no folder for class(es) {', '.join(map(repr, missing))}. "
            f"Every split needs one folder per class: {', '.join(CLASS_NAMES)}."
        )
    return found


def _has_class_folders(path: Path) -> bool:
    return any(canonical_class(p.name) for p in _visible_dirs(path))


@dataclass(frozen=True)
class DatasetLocation:
    root: Path  # the folder the splits were found in
    train_dir: Path
    test_dir: Path | None  # None: flat layout, no official test split
    layout: str  # "train-test" or "flat"


def locate_dataset(path: str | Path) -> DatasetLocation:
    """Find ``train/`` + ``test/`` (or a flat set of class folders) at or below ``path``."""
    path = Path(path).expanduser()
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
            problem = "is a link whose target does not exist"
        except RuntimeError:  # Python 3.11 raises this for a loop of links
            problem = "is a link that loops (it leads back to itself through other links)"
        except OSError as exc:
            problem = ("is a link that loops (it leads back to itself through other links)" if exc.errno == errno.ELOOP
                       else f"is a link whose target does not exist ({os.readlink(path)})")
        raise DataError(f"Data path {path} {problem}. Point DATA= (or --data) at the dataset folder itself, or fix "
                        f"the link (`ls -l {path}` shows where it points).")
    if not path.exists():
        raise DataError(
            f"Data path {path} does not exist. Point DATA= (or --data) at the dataset folder, run "
            f"`make download` to fetch the Kaggle dataset, or leave DATA unset to use the synthetic set."
        )
    if not path.is_dir():
        raise DataError(f"Data path {path} is a file; DATA= (or --data) must be a folder of images.")
    _refuse_root_or_home(path)

    # Breadth-first, so the shallowest match wins (kagglehub path -> Covid19-dataset/ -> train/).
    queue, searched = [(path, 0)], 0
    while queue:
        folder, depth = queue.pop(0)
        searched += 1
        if searched > _MAX_FOLDERS_SEARCHED:
            raise DataError(
                f"No chest X-ray dataset found in the first {_MAX_FOLDERS_SEARCHED} folders under {path}: "
                f"DATA= (or --data) must point at the dataset folder itself (the one holding train/ and test/, "
                f"or the class folders), "
                f"not at a large tree such as / or your home folder."
            )
        train = _child(folder, "train")
        if train is not None and _has_class_folders(train):
            test = _child(folder, "test")
            if test is None:
                return DatasetLocation(folder, train, None, "flat")
            return DatasetLocation(folder, train, test, "train-test")
        if _has_class_folders(folder):
            return DatasetLocation(folder, folder, None, "flat")
        if depth < _MAX_SEARCH_DEPTH:
            queue.extend((sub, depth + 1) for sub in _visible_dirs(folder))
    raise DataError(
        f"No chest X-ray dataset found in {path}. Expected train/ and test/ folders each holding "
        f"{', '.join(CLASS_NAMES)} class folders (the Kaggle 'Covid19-dataset' layout), or a folder of class "
        f"folders, in it or at most {_MAX_SEARCH_DEPTH} folder levels below it. Point DATA= (or --data) at the dataset "
        f"folder itself, run `make download`, or leave DATA unset to use the synthetic set."
    )


def _refuse_root_or_home(path: Path) -> None:
    """DATA=/ or DATA=~ is a slip, never a dataset: refused before anything below it is listed."""
    resolved = path.resolve()
    if resolved.parent == resolved:
        what = "the root folder"
    elif resolved == Path.home().resolve():
        what = "your home folder"
    else:
        return
    raise DataError(
        f"Data path {path} is {what}: DATA= (or --data) must point at the dataset folder itself (the one holding "
        f"train/ and test/, or the class folders, e.g. DATA=~/Downloads/Covid19-dataset), which is never searched for "
        f"from {what}. Run `make download` to fetch it into data/kaggle, or leave DATA unset to use the synthetic set."
    )
