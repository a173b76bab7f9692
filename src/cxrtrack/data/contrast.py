"""Contrast normalisation for radiographs (``data.equalize``), applied once to the decoded uint8 cache.

Applied to every split the same way (train, validation and test: the model never sees an image that was
not equalised), after the resize and before any augmentation. It is part of the cache, not of the
per-epoch transforms, so it costs one pass over the images per run, never per epoch.

- ``histogram``: global histogram equalisation of each image (torchvision's ``equalize``);
- ``clahe``: contrast-limited adaptive histogram equalisation of each image (kornia's ``equalize_clahe``,
  OpenCV's algorithm: ``clahe_grid`` x ``clahe_grid`` tiles, ``clahe_clip_limit`` relative to the mean
  bin count; 0 disables the limit).
"""

from __future__ import annotations

from typing import Any

import torch

_CHUNK = 64  # images per call: bounds the float copy kornia makes


def equalize_images(images: torch.Tensor, data_cfg: dict[str, Any]) -> torch.Tensor:
    """``(N, 1, H, W)`` uint8 -> the same shape and dtype, equalised per image as ``data.equalize`` says."""
    mode = data_cfg.get("equalize", "none")
    if mode == "none" or images.numel() == 0:
        return images
    if mode == "histogram":
        from torchvision.transforms.v2 import functional as F

        return F.equalize(images)
    from kornia.enhance import equalize_clahe

    grid = int(data_cfg["clahe_grid"])
    out = torch.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start:start + _CHUNK].float().div_(255)
        eq = equalize_clahe(chunk, clip_limit=float(data_cfg["clahe_clip_limit"]), grid_size=(grid, grid))
        out[start:start + _CHUNK] = eq.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return out
