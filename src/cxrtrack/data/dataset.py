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
import hashlib
import logging
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
from cxrtrack.data.images import UnreadableImageError, decode_image
from cxrtrack.data.layout import DatasetLocation, class_folders, locate_dataset
from cxrtrack.data.synthetic import SYNTHETIC_MARKER, ensure_synthetic_dataset
from cxrtrack.data.transforms import build_transforms
from cxrtrack.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


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
    val: CXRDataset
    test: CXRDataset
    location: DatasetLocation
    source: str  # "kaggle" | "synthetic" | "local"
    fingerprint: str
    skipped: list[SkippedFile]
    test_split: str  # "official" or "carved" (flat layout: no official test split)
    image_size: int
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def cache_bytes(self) -> int:
        return sum(d.split.images.numel() * d.split.images.element_size() for d in (self.train, self.val, self.test))

    def with_transforms(self, data_cfg: dict[str, Any]) -> CXRData:
        """The same decoded images behind the transforms of ``data_cfg`` (augmentation, normalisation)."""
        train_tf, eval_tf = build_transforms(data_cfg)
        return dataclasses.replace(
            self, train=CXRDataset(self.train.split, train_tf), val=CXRDataset(self.val.split, eval_tf),
            test=CXRDataset(self.test.split, eval_tf),
        )

    def loaders(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> dict[str, DataLoader]:
        generator = torch.Generator().manual_seed(seed)  # the shuffling order is part of the seed
        common = dict(batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)
        return {
            "train": DataLoader(self.train, shuffle=True, generator=generator, **common),
            "val": DataLoader(self.val, shuffle=False, **common),
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
            ds: CXRDataset = getattr(self, split)
            out[f"n_{split}"] = len(ds)
            for name, count in ds.class_counts().items():
                out[f"n_{split}_{slug(name)}"] = count
        return out


def slug(name: str) -> str:
    """``"Viral Pneumonia"`` -> ``"viral_pneumonia"``; ``"COVID-19"`` -> ``"covid19"`` (metric-key safe)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower().replace("-", "")).strip("_")


def list_files(split_dir: Path) -> list[tuple[Path, int]]:
    """(file, label) for every non-hidden file in each class folder of one split, sorted."""
    files = []
    for name, folder in class_folders(split_dir).items():
        label = CLASS_NAMES.index(name)
        # Everything but folders and hidden files: a broken symlink is listed too, so it is reported as unreadable.
        files += [(p, label) for p in sorted(folder.iterdir()) if not p.is_dir() and not p.name.startswith(".")]
    return files


def decode_files(files: list[tuple[Path, int]], size: int, relative_to: Path, workers: int = 2, desc: str = "") -> DecodedSplit:
    """Read, hash and decode every file once (threads: Pillow releases the GIL while decoding)."""

    def work(item: tuple[Path, int]):
        path, _ = item
        try:
            data = path.read_bytes()
        except OSError as exc:  # permission denied, broken symlink, I/O error: skipped and reported like a corrupt file
            return f"unreadable:{type(exc).__name__}", None, f"cannot read the file ({type(exc).__name__}: {exc.strerror or exc})"
        digest = hashlib.sha256(data).hexdigest()
        try:
            return digest, decode_image(data, size), None
        except UnreadableImageError as exc:
            return digest, None, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(work, files), total=len(files), desc=f"decode {desc}", unit="img", leave=False))

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


def _check_classes(split: DecodedSplit, where: Path) -> None:
    counts = Counter(split.labels)
    empty = [name for i, name in enumerate(CLASS_NAMES) if counts.get(i, 0) == 0]
    if empty:
        raise DataError(
            f"Class(es) {', '.join(map(repr, empty))} in {where} have no readable images"
            f"{f' ({len(split.skipped)} file(s) could not be decoded)' if split.skipped else ''}. "
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
        h.update(f"{rel}\0{digests[rel]}\n".encode())
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

    train_all = decode_files(list_files(location.train_dir), size, location.root, workers, "train")
    _check_classes(train_all, location.train_dir)
    digests = dict(train_all.digests)
    skipped = list(train_all.skipped)
    if location.test_dir is not None:
        test = decode_files(list_files(location.test_dir), size, location.root, workers, "test")
        _check_classes(test, location.test_dir)
        digests.update(test.digests)
        skipped += test.skipped
        test_split = "official"
    else:
        log.warning(
            "%s has no official test/ split: holding out a stratified %.0f%% of it (seed %d) as the test split.",
            location.train_dir, 100 * data_cfg["test_fraction"], seed,
        )
        train_all, test = _stratified_split(train_all, data_cfg["test_fraction"], seed, "test")
        test_split = "carved"
    train, val = _stratified_split(train_all, data_cfg["val_fraction"], seed, "val")

    for item in skipped:
        log.warning("Skipped unreadable file %s (%s)", item.path, item.reason)
    train_tf, eval_tf = build_transforms(data_cfg)
    data = CXRData(
        train=CXRDataset(train, train_tf),
        val=CXRDataset(val, eval_tf),
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
        location.root, source, location.layout, len(data.train), len(data.val), len(data.test),
        len(skipped), data.fingerprint, data.cache_bytes / 2**20,
    )
    return data


# The settings that change what is decoded and how it is split; everything else in `data` only changes
# the transforms or the loaders, which are cheap to rebuild.
_DECODE_KEYS = ("path", "download_dir", "synthetic_dir", "synthetic_seed", "image_size", "val_fraction",
                "test_fraction")


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
