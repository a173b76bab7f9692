"""torchvision (v2) transforms applied to the cached ``(1, size, size)`` uint8 images.

Resizing happens once, when the image is decoded into the cache (see ``images.py``); these
transforms add train-time augmentation, scaling to float, channel replication and normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2


def build_transforms(data_cfg: dict[str, Any]) -> tuple[v2.Compose, v2.Compose]:
    """(train transform, evaluation transform) for the ``data`` config section."""
    channels = data_cfg["channels"]
    to_model = [
        v2.ToDtype(torch.float32, scale=True),
        *([v2.Grayscale(num_output_channels=3)] if channels == 3 else []),
        v2.Normalize([data_cfg["normalize_mean"]] * channels, [data_cfg["normalize_std"]] * channels),
    ]
    aug_cfg = data_cfg["augment"]
    augment = []
    if aug_cfg["enabled"]:
        augment = [
            v2.RandomHorizontalFlip(p=aug_cfg["hflip"]),
            v2.RandomAffine(
                degrees=aug_cfg["rotation"],
                translate=(aug_cfg["translate"], aug_cfg["translate"]),
                scale=tuple(aug_cfg["scale"]),
                fill=0,
            ),
            v2.ColorJitter(brightness=aug_cfg["brightness"], contrast=aug_cfg["contrast"]),
        ]
    return v2.Compose(augment + to_model), v2.Compose(to_model)


def denormalize(batch: torch.Tensor, data_cfg: dict[str, Any]) -> torch.Tensor:
    """Invert the normalisation for display: returns values in [0, 1]."""
    return (batch * data_cfg["normalize_std"] + data_cfg["normalize_mean"]).clamp(0, 1)
