"""Transforms applied to the cached ``(1, size, size)`` uint8 images, and the batch-level ones.

Resizing happens once, when the image is decoded into the cache (see ``images.py``), and so does the
contrast normalisation (``data.equalize``, see ``contrast.py``). These transforms add train-time
augmentation, scaling to float, channel replication and normalisation:

- :func:`build_transforms`: per image, on the CPU, in the DataLoader (torchvision v2): the default;
- :func:`build_batch_augment`: per image but a whole batch at once, on the training device (kornia),
  for ``data.pipeline: batched``; the same distributions of flip, crop, affine and jitter;
- :func:`build_mix`: MixUp / CutMix of whole batches (torchvision v2), applied in the training step
  either way, since they mix images *and* labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2


def _to_model(data_cfg: dict[str, Any]) -> list:
    channels = data_cfg["channels"]
    return [
        v2.ToDtype(torch.float32, scale=True),
        *([v2.Grayscale(num_output_channels=3)] if channels == 3 else []),
        v2.Normalize([data_cfg["normalize_mean"]] * channels, [data_cfg["normalize_std"]] * channels),
    ]


def build_transforms(data_cfg: dict[str, Any]) -> tuple[v2.Compose, v2.Compose]:
    """(train transform, evaluation transform) for the ``data`` config section."""
    to_model = _to_model(data_cfg)
    aug_cfg = data_cfg["augment"]
    augment = []
    if aug_cfg["enabled"]:
        size = data_cfg["image_size"]
        # .get: a checkpoint written before these switches existed has no such keys in its config
        augment = [
            *([v2.RandomResizedCrop(size, scale=tuple(aug_cfg["crop_scale"]), ratio=tuple(aug_cfg["crop_ratio"]),
                                    antialias=True)] if aug_cfg.get("resized_crop") else []),
            v2.RandomHorizontalFlip(p=aug_cfg["hflip"]),
            v2.RandomAffine(
                degrees=aug_cfg["rotation"],
                translate=(aug_cfg["translate"], aug_cfg["translate"]),
                scale=tuple(aug_cfg["scale"]),
                shear=aug_cfg.get("shear") or None,
                fill=0,
            ),
            v2.ColorJitter(brightness=aug_cfg["brightness"], contrast=aug_cfg["contrast"]),
        ]
    return v2.Compose(augment + to_model), v2.Compose(to_model)


def build_batch_transforms(data_cfg: dict[str, Any], train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """For ``data.pipeline: batched``: a function from a uint8 batch ``(B, 1, H, W)`` on the training device to the
    model's float input, augmented per image (``train``) with kornia, then scaled and normalised like
    :func:`build_transforms`."""
    aug_cfg = data_cfg["augment"]
    augment = build_batch_augment(data_cfg) if train and aug_cfg["enabled"] else None
    mean, std, channels = data_cfg["normalize_mean"], data_cfg["normalize_std"], data_cfg["channels"]

    def transform(batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div_(255)
        if augment is not None:
            x = augment(x).clamp_(0, 1)
        x = (x - mean) / std
        return x.expand(-1, 3, -1, -1).contiguous() if channels == 3 else x

    return transform


def build_batch_augment(data_cfg: dict[str, Any]) -> torch.nn.Module:
    """kornia's batched augmentation with the same settings and order as the per-image torchvision pipeline:
    each image of the batch gets its own random crop, flip, affine and jitter."""
    import kornia.augmentation as K

    aug_cfg, size = data_cfg["augment"], data_cfg["image_size"]
    steps: list[K.AugmentationBase2D] = []
    if aug_cfg["resized_crop"]:
        steps.append(K.RandomResizedCrop((size, size), scale=tuple(aug_cfg["crop_scale"]),
                                         ratio=tuple(aug_cfg["crop_ratio"]), p=1.0))
    steps += [
        K.RandomHorizontalFlip(p=aug_cfg["hflip"]),
        K.RandomAffine(degrees=aug_cfg["rotation"], translate=(aug_cfg["translate"], aug_cfg["translate"]),
                       scale=tuple(aug_cfg["scale"]), shear=aug_cfg["shear"] or None, padding_mode="zeros", p=1.0),
    ]
    if aug_cfg["brightness"] or aug_cfg["contrast"]:
        steps.append(K.ColorJitter(brightness=aug_cfg["brightness"], contrast=aug_cfg["contrast"], p=1.0))
    return K.AugmentationSequential(*steps)


def build_mix(data_cfg: dict[str, Any], num_classes: int = 3):
    """MixUp and/or CutMix of a batch (images, int labels) -> (images, soft labels), or None when both are off."""
    aug_cfg = data_cfg["augment"]
    if not aug_cfg["enabled"]:
        return None
    mixes = []
    if aug_cfg.get("mixup_alpha", 0) > 0:
        mixes.append(v2.MixUp(alpha=aug_cfg["mixup_alpha"], num_classes=num_classes))
    if aug_cfg.get("cutmix_alpha", 0) > 0:
        mixes.append(v2.CutMix(alpha=aug_cfg["cutmix_alpha"], num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def denormalize(batch: torch.Tensor, data_cfg: dict[str, Any]) -> torch.Tensor:
    """Invert the normalisation for display: returns values in [0, 1]."""
    return (batch * data_cfg["normalize_std"] + data_cfg["normalize_mean"]).clamp(0, 1)
