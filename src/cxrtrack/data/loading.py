"""Batches for the trainer: the DataLoader path (per-image CPU transforms) or the on-device path.

``data.pipeline: per_image`` (``auto`` on a CPU): :meth:`CXRData.loaders`, a DataLoader per split whose
dataset applies the torchvision transforms image by image on the CPU.

``data.pipeline: batched`` (``auto`` on a GPU): each split's decoded uint8 cache is moved to the training device once
(a few MB; on a GPU the data then never crosses the bus again), batches are cut from it there, and
augmentation runs on whole batches on the device (kornia: every image still gets its own random
parameters). The shuffling order comes from a seeded generator, as with the DataLoader.
"""

from __future__ import annotations

from typing import Any

import torch

from cxrtrack.data.dataset import CXRData, CXRDataset
from cxrtrack.data.transforms import build_batch_transforms


class DeviceLoader:
    """Batches of one split cut from its cache on ``device``; ``transform`` maps uint8 batches to model input."""

    def __init__(self, dataset: CXRDataset, batch_size: int, device: torch.device, transform, *, shuffle: bool = False,
                 seed: int = 0):
        self.dataset = dataset  # for len() and labels, like a DataLoader's
        self.images = dataset.split.images.to(device)
        self.labels = torch.as_tensor(dataset.split.labels, dtype=torch.long, device=device)
        self.batch_size, self.transform, self.shuffle = batch_size, transform, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.transform(self.images[idx]), self.labels[idx]


def resolve_pipeline(data_cfg: dict[str, Any], device: torch.device) -> str:
    """``per_image`` or ``batched`` for ``data.pipeline`` on ``device`` (``auto``: batched on a GPU)."""
    pipeline = data_cfg.get("pipeline", "per_image")
    if pipeline == "auto":
        return "batched" if device.type in ("cuda", "mps") else "per_image"
    return pipeline


def build_loaders(data: CXRData, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The train/val/test batches for ``cfg`` (``val`` is None when the data has no validation split)."""
    data_cfg = cfg["data"]
    if resolve_pipeline(data_cfg, device) == "per_image":
        return data.loaders(data_cfg["batch_size"], data_cfg["num_workers"], cfg["seed"])
    train_tf, eval_tf = build_batch_transforms(data_cfg, train=True), build_batch_transforms(data_cfg, train=False)
    size = data_cfg["batch_size"]
    return {
        "train": DeviceLoader(data.train, size, device, train_tf, shuffle=True, seed=cfg["seed"]),
        "val": DeviceLoader(data.val, size, device, eval_tf) if data.val is not None else None,
        "test": DeviceLoader(data.test, size, device, eval_tf),
    }


def example_batch(data: CXRData, loaders: dict[str, Any], n: int = 16) -> torch.Tensor:
    """Up to ``n`` augmented training images exactly as the model sees them (normalised, on the CPU)."""
    train = loaders["train"]
    if isinstance(train, DeviceLoader):
        idx = torch.arange(min(n, len(train.labels)), device=train.images.device)
        return train.transform(train.images[idx]).cpu()
    return torch.stack([data.train[i][0] for i in range(min(n, len(data.train)))])
