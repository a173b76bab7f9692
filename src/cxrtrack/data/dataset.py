"""The chest X-ray dataset: scan, decode once into an in-memory cache, split, transform, load.

``build_data(cfg["data"], seed)`` returns a :class:`CXRData` with train/val/test datasets:

- The official ``test/`` split is only ever used for the final evaluation. Validation (model
  selection, early stopping, LR schedule) is a stratified, seeded split of ``train/``.
- Every file is read and decoded exactly once per run, in a thread pool, and kept as a
  ``(1, size, size)`` uint8 tensor. The cache costs ``N * size * size`` bytes: 317 images take
  1.3 MB at 64 px, 5.2 MB at 128 px, 15.9 MB at 224 px and 20.8 MB at 256 px.
- A file that cannot be decoded (corrupt, truncated, empty, not an image) is skipped and reported by
  path; it is never replaced by a blank image. A class left without images is an error.
- The content fingerprint is a SHA-256 over every file's relative path and bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cxrtrack import CLASS_NAMES
from cxrtrack.data.contrast import equalize_images
from cxrtrack.data.images import UnreadableImageError, decode_image
from cxrtrack.data.layout import DatasetLocation, class_folders, locate_dataset
from cxrtrack.data.synthetic import SYNTHETIC_MARKER, ensure_synthetic_dataset
from cxrtrack.data.transforms import build_transforms
from cxrtrack.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # data.max_file_mb's default


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


# skipped_files.txt: one skipped file a line, "<path>\t<reason>", each field escaped so that a file name with a
# newline or a tab (both allowed on Linux) cannot split its record or fake another one.
SKIPPED_HEADER = ("# path<TAB>reason, one skipped file a line; in both fields \\\\ \\t \\n \\r stand for a backslash, "
                  "tab, newline and carriage return, \\xNN (hex) for another control character (00-1f, 7f) or a byte "
                  "of the name that is not UTF-8 (80-ff), \\uNNNN for another line separator\n")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_LINE_BREAKS = {"\x85", "\u2028", "\u2029"}  # also lines ends for str.splitlines, with \x1c-\x1e (escaped as \xNN)


def escape_field(text: str) -> str:
    """``text`` on one line without a tab, reversibly (:func:`unescape_field`): see SKIPPED_HEADER."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte of the file name that is not UTF-8 (Python's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _LINE_BREAKS or 0x80 <= code <= 0x9F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_field(text: str) -> str:
    """The inverse of :func:`escape_field`."""
    def one(match: re.Match) -> str:
        code = match.group(1)
        if code[0] == "x":
            value = int(code[1:], 16)
            return chr(0xDC00 + value) if value >= 0x80 else chr(value)
        if code[0] == "u":
            return chr(int(code[1:], 16))
        return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[code]

    return re.sub(r"\\(\\|t|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})", one, text)


def skipped_report(skipped: Sequence[SkippedFile]) -> str:
    """The text of skipped_files.txt: a header line, then one escaped ``path<TAB>reason`` line per file."""
    return SKIPPED_HEADER + "".join(f"{escape_field(str(s.path))}\t{escape_field(s.reason)}\n" for s in skipped)


def read_skipped_report(text: str) -> list[SkippedFile]:
    """The files listed in a skipped_files.txt (the inverse of :func:`skipped_report`)."""
    records = []
    lines = text.split("\n")
    for line in lines[1:] if lines and lines[0].startswith("#") else lines:
        if line:
            path, _, reason = line.partition("\t")
            records.append(SkippedFile(Path(unescape_field(path)), unescape_field(reason)))
    return records


@dataclass
class DecodedSplit:
    """Images of one split, decoded and resized once."""

    images: torch.Tensor  # (N, 1, size, size) uint8
    labels: list[int]
    paths: list[Path]
    skipped: list[SkippedFile] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of the bytes

    def subset(self, indices: Sequence[int]) -> DecodedSplit:
        idx = list(indices)
        return DecodedSplit(self.images[idx], [self.labels[i] for i in idx], [self.paths[i] for i in idx])


class CXRDataset(Dataset):
    """Serves cached uint8 images through a torchvision transform; never touches the disk."""

    def __init__(self, split: DecodedSplit, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.images[index]), self.split.labels[index]

    @property
    def labels(self) -> list[int]:
        return self.split.labels

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.split.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(CLASS_NAMES)}


@dataclass
class CXRData:
    train: CXRDataset
    val: CXRDataset | None  # None: no validation split (a retrain on all of train/ after cross-validation)
    test: CXRDataset
    location: DatasetLocation
    source: str  # "kaggle" | "synthetic" | "local"
    fingerprint: str
    skipped: list[SkippedFile]
    test_split: str  # "official", "carved" (flat layout: no official test split) or "none" (test_fraction 0)
    image_size: int
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def cache_bytes(self) -> int:
        return sum(d.split.images.numel() * d.split.images.element_size() for d in (self.train, self.val, self.test)
                   if d is not None)

    def with_transforms(self, data_cfg: dict[str, Any]) -> CXRData:
        """The same decoded images behind the transforms of ``data_cfg`` (augmentation, normalisation)."""
        train_tf, eval_tf = build_transforms(data_cfg)
        return dataclasses.replace(
            self, train=CXRDataset(self.train.split, train_tf),
            val=CXRDataset(self.val.split, eval_tf) if self.val is not None else None,
            test=CXRDataset(self.test.split, eval_tf),
        )

    def loaders(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> dict[str, DataLoader | None]:
        """The train/val/test loaders (``val`` is None when the data has no validation split)."""
        generator = torch.Generator().manual_seed(seed)  # the shuffling order is part of the seed
        common: dict[str, Any] = dict(batch_size=batch_size, num_workers=num_workers,
                                      persistent_workers=num_workers > 0)
        return {
            "train": DataLoader(self.train, shuffle=True, generator=generator, **common),
            "val": DataLoader(self.val, shuffle=False, **common) if self.val is not None else None,
            "test": DataLoader(self.test, shuffle=False, **common),
        }

    def summary(self) -> dict[str, Any]:
        """What every tracked run records about its data."""
        out: dict[str, Any] = {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "root": str(self.location.root),
            "layout": self.location.layout,
            "test_split": self.test_split,
            "n_skipped": len(self.skipped),
            "cache_mb": round(self.cache_bytes / 2**20, 2),
        }
        for split in ("train", "val", "test"):
            ds: CXRDataset | None = getattr(self, split)
            if ds is None:
                continue
            out[f"n_{split}"] = len(ds)
            for name, count in ds.class_counts().items():
                out[f"n_{split}_{slug(name)}"] = count
        return out


def slug(name: str) -> str:
    """``"Viral Pneumonia"`` -> ``"viral_pneumonia"``; ``"COVID-19"`` -> ``"covid19"`` (metric-key safe)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower().replace("-", "")).strip("_")


def _describe_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def scan_class_folder(folder: Path, root: Path, max_bytes: int) -> tuple[list[Path], list[SkippedFile]]:
    """The image files of one class folder, and every other visible entry with the reason it is skipped.

    Only regular files are read: a link is followed only when its target is a regular file inside the
    dataset folder ``root``; folders, pipes, devices, broken or looping links and files over ``max_bytes``
    are skipped and reported. Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are ignored silently.
    """
    root = root.resolve()
    files, skipped = [], []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return [], [SkippedFile(folder, f"cannot list the folder ({exc.strerror or exc})")]
    for path in entries:
        if path.name.startswith("."):
            continue
        link = path.is_symlink()
        try:
            target = path.resolve(strict=True)
            info = target.stat()
        except FileNotFoundError:
            skipped.append(SkippedFile(path, "cannot read the file (broken link: its target does not exist)"))
            continue
        except RuntimeError:  # Python < 3.13 reports a symlink loop this way
            skipped.append(SkippedFile(path, "cannot read the file (a link that loops back on itself)"))
            continue
        except OSError as exc:
            reason = "a link that loops back on itself" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            skipped.append(SkippedFile(path, f"cannot read the file ({reason})"))
            continue
        if link and not target.is_relative_to(root):
            skipped.append(SkippedFile(path, f"a link to {target}, outside the dataset folder {root} (only files "
                                             f"inside it are read; copy the file in instead)"))
        elif stat.S_ISDIR(info.st_mode):
            what = "a link to a folder" + (" that contains it (a loop)" if path.parent.resolve().is_relative_to(target)
                                          else "") if link else "a folder"
            skipped.append(SkippedFile(path, f"{what}, not an image (class folders are read one level deep)"))
        elif not stat.S_ISREG(info.st_mode):
            skipped.append(SkippedFile(path, f"{_describe_kind(info.st_mode)}, not an image file"))
        elif info.st_size > max_bytes:
            skipped.append(SkippedFile(path, f"{info.st_size / 2**20:,.1f} MB, over the limit of data.max_file_mb="
                                             f"{max_bytes / 2**20:g} (raise it if the file is a real image)"))
        else:
            files.append(path)
    return files, skipped


def scan_split(split_dir: Path, root: Path | None = None,
               max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[list[tuple[Path, int]], list[SkippedFile]]:
    """(file, label) for every image file in each class folder of one split, sorted, and what was skipped."""
    files, skipped = [], []
    for name, folder in class_folders(split_dir).items():
        label = CLASS_NAMES.index(name)
        found, passed = scan_class_folder(folder, root or split_dir, max_bytes)
        files += [(p, label) for p in found]
        skipped += passed
    return files, skipped


def list_files(split_dir: Path) -> list[tuple[Path, int]]:
    """(file, label) for every image file in each class folder of one split, sorted (see :func:`scan_split`)."""
    return scan_split(split_dir)[0]


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``, else :class:`OSError`.

    Opened non-blocking and checked on the open descriptor, so a file swapped for a pipe or a device after the
    folder was scanned is still never read from (a FIFO would block for ever, /dev/zero never ends)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{_describe_kind(info.st_mode)}, not an image file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"over the limit of data.max_file_mb={max_bytes / 2**20:g}")
    return data


def decode_files(files: list[tuple[Path, int]], size: int, relative_to: Path, workers: int = 2, desc: str = "",
                 max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> DecodedSplit:
    """Read, hash and decode every file once (threads: Pillow releases the GIL while decoding)."""

    def work(item: tuple[Path, int]):
        path, _ = item
        try:
            data = read_regular_file(path, max_bytes)
        except OSError as exc:  # permission denied, broken symlink, I/O error: skipped and reported like a corrupt file
            return f"unreadable:{type(exc).__name__}", None, f"cannot read the file ({exc.strerror or exc})"
        digest = hashlib.sha256(data).hexdigest()
        try:
            return digest, decode_image(data, size), None
        except UnreadableImageError as exc:
            return digest, None, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(work, files), total=len(files), desc=f"decode {desc}", unit="img", leave=False,
                            disable=None))  # a bar on a terminal only

    images, labels, paths, skipped, digests = [], [], [], [], {}
    for (path, label), (digest, tensor, error) in zip(files, results, strict=True):
        digests[path.relative_to(relative_to).as_posix()] = digest
        if error is not None:
            skipped.append(SkippedFile(path, error))
            continue
        images.append(tensor)
        labels.append(label)
        paths.append(path)
    stacked = torch.stack(images) if images else torch.empty((0, 1, size, size), dtype=torch.uint8)
    return DecodedSplit(stacked, labels, paths, skipped, digests)


def _check_classes(split: DecodedSplit, where: Path, skipped: list[SkippedFile] | None = None) -> None:
    counts = Counter(split.labels)
    empty = [name for i, name in enumerate(CLASS_NAMES) if counts.get(i, 0) == 0]
    if empty:
        skipped = split.skipped if skipped is None else skipped
        examples = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:3])
        raise DataError(
            f"Class(es) {', '.join(map(repr, empty))} in {where} have no readable images"
            f"{f' ({len(skipped)} file(s) could not be decoded or read, e.g. {examples})' if skipped else ''}. "
            f"Every class needs images in every split; add images or fix the folder."
        )


def _stratified_split(split: DecodedSplit, fraction: float, seed: int, what: str) -> tuple[DecodedSplit, DecodedSplit]:
    indices = list(range(len(split.labels)))
    try:
        keep, held = train_test_split(indices, test_size=fraction, stratify=split.labels, random_state=seed)
    except ValueError as exc:
        raise DataError(
            f"Cannot carve a stratified {what} split ({fraction:.0%}) from {len(indices)} images: {exc}. "
            f"Each class needs at least 2 images and the {what} split at least one per class; add images "
            f"or change data.{what}_fraction."
        ) from None
    return split.subset(sorted(keep)), split.subset(sorted(held))


def detect_source(location: DatasetLocation, requested: Path) -> str:
    """``synthetic`` if the generator's marker is beside the data, ``kaggle`` for the Kaggle layout, else ``local``."""
    for folder in (location.root, *location.root.parents[:3], requested):
        if (folder / SYNTHETIC_MARKER).exists():
            return "synthetic"
    names = {p.name.lower() for p in (location.root, *location.root.parents[:3])}
    return "kaggle" if "covid19-dataset" in names else "local"


def fingerprint_of(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(digests):
        # surrogateescape: a file name that is not UTF-8 is hashed as its bytes (it used to raise UnicodeEncodeError)
        h.update(f"{rel}\0{digests[rel]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def resolve_data_path(data_cfg: dict[str, Any]) -> Path:
    """The folder to train on: ``data.path`` if set, else the Kaggle download, else the synthetic set."""
    if data_cfg.get("path"):
        return Path(data_cfg["path"]).expanduser()
    download_dir = Path(data_cfg["download_dir"])
    if download_dir.is_dir():
        try:
            locate_dataset(download_dir)
            return download_dir
        except DataError:
            log.warning("Ignoring %s: it holds no complete dataset (re-run `make download`).", download_dir)
    root = Path(data_cfg["synthetic_dir"])
    ensure_synthetic_dataset(root, seed=data_cfg["synthetic_seed"])
    return root


SYNTHETIC_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  SYNTHETIC DATA: no real chest X-rays were found, so this run uses the generated stand-in set\n"
    "!!  in {path}. It exercises the real loading path, but its results mean NOTHING clinically.\n"
    "!!  Get the real dataset with `make download`, or point DATA=<folder> at your copy.\n" + "!" * 78
)


def build_data(data_cfg: dict[str, Any], seed: int) -> CXRData:
    """Locate, decode (once), split and wrap the dataset described by the ``data`` config section."""
    requested = resolve_data_path(data_cfg)
    location = locate_dataset(requested)
    source = detect_source(location, requested)
    if source == "synthetic":
        log.warning(SYNTHETIC_BANNER.format(path=location.root))
    size, workers = data_cfg["image_size"], data_cfg["decode_workers"]
    max_bytes = int(data_cfg.get("max_file_mb", DEFAULT_MAX_FILE_BYTES / 2**20) * 2**20)

    files, skipped = scan_split(location.train_dir, location.root, max_bytes)
    train_all = decode_files(files, size, location.root, workers, "train", max_bytes)
    skipped += train_all.skipped
    _check_classes(train_all, location.train_dir, skipped)
    digests = dict(train_all.digests)
    if location.test_dir is not None:
        files, test_skipped = scan_split(location.test_dir, location.root, max_bytes)
        test = decode_files(files, size, location.root, workers, "test", max_bytes)
        skipped += test_skipped + test.skipped
        _check_classes(test, location.test_dir, test_skipped + test.skipped)
        digests.update(test.digests)
        test_split = "official"
    elif data_cfg["test_fraction"] == 0:  # cross-validation on every image; the test split is held out elsewhere
        log.info("%s has no official test/ split and data.test_fraction is 0: no test split (nothing is tested).",
                 location.train_dir)
        test, test_split = train_all.subset([]), "none"
    else:
        log.warning(
            "%s has no official test/ split: holding out a stratified %.0f%% of it (seed %d) as the test split.",
            location.train_dir, 100 * data_cfg["test_fraction"], seed,
        )
        train_all, test = _stratified_split(train_all, data_cfg["test_fraction"], seed, "test")
        test_split = "carved"
    # contrast normalisation: once, on the cache, identically for every split (before the val split is drawn)
    train_all.images, test.images = equalize_images(train_all.images, data_cfg), equalize_images(test.images, data_cfg)
    train, val = _stratified_split(train_all, data_cfg["val_fraction"], seed, "val")

    for item in skipped:
        log.warning("Skipped %s: %s", escape_field(str(item.path)), escape_field(item.reason))
    train_tf, eval_tf = build_transforms(data_cfg)
    val_set = CXRDataset(val, eval_tf)  # CXRData.val may be None; here there is always a validation split
    data = CXRData(
        train=CXRDataset(train, train_tf),
        val=val_set,
        test=CXRDataset(test, eval_tf),
        location=location,
        source=source,
        fingerprint=fingerprint_of(digests),
        skipped=skipped,
        test_split=test_split,
        image_size=size,
    )
    log.info(
        "Data: %s (%s, %s layout) train=%d val=%d test=%d, %d skipped, fingerprint %s, cache %.1f MB",
        location.root, source, location.layout, len(data.train), len(val_set), len(data.test),
        len(skipped), data.fingerprint, data.cache_bytes / 2**20,
    )
    return data


# The settings that change what is decoded and how it is split; everything else in `data` only changes
# the transforms or the loaders, which are cheap to rebuild.
_DECODE_KEYS = ("path", "download_dir", "synthetic_dir", "synthetic_seed", "image_size", "val_fraction",
                "test_fraction", "equalize", "clahe_clip_limit", "clahe_grid")


class DataCache:
    """Decode once, train many times: tuning trials and repeated runs in one process share the decoded
    images as long as the settings in ``_DECODE_KEYS`` and the seed (which draws the split) are equal."""

    def __init__(self) -> None:
        self._data: dict[tuple, CXRData] = {}
        self.builds = 0  # how many times the images were actually decoded

    def get(self, data_cfg: dict[str, Any], seed: int) -> CXRData:
        key = (*(str(data_cfg.get(k)) for k in _DECODE_KEYS), seed)
        if key not in self._data:
            self._data[key] = build_data(data_cfg, seed)
            self.builds += 1
            return self._data[key]
        return self._data[key].with_transforms(data_cfg)
