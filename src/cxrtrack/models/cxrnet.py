"""CustomCXRNet: the small CNN from the design card.

    Conv 16 (3x3, no padding) -> ReLU -> MaxPool
    Conv 64 (3x3, same)       -> ReLU -> MaxPool -> Dropout 0.25
    Conv 128 (3x3, same)      -> ReLU -> MaxPool -> Dropout 0.30
    Conv 128 (3x3, same)      -> ReLU -> MaxPool -> Dropout 0.40
    Flatten -> Dense 128 -> ReLU -> Dropout 0.25 -> Dense 64 -> ReLU -> Dense 3

``forward`` returns logits: ``nn.CrossEntropyLoss`` applies log-softmax itself, so a softmax inside the
model (a bug in the prior art) would squash the gradients. Use :meth:`predict_proba` for probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cxrtrack import IMAGE_SIZE_RANGE

SUPPORTED_SIZES = (64, 128, 224, 256)  # the sizes the tests train at; any size in IMAGE_SIZE_RANGE works


def _conv_block(c_in: int, c_out: int, padding: int, dropout: float | None) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=padding), nn.ReLU(inplace=True),
                               nn.MaxPool2d(2)]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return layers


class CustomCXRNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        image_size: int = 128,
        dropout_conv: Sequence[float] = (0.25, 0.30, 0.40),
        dropout_dense: float = 0.25,
    ):
        super().__init__()
        low, high = IMAGE_SIZE_RANGE
        if not low <= image_size <= high:
            raise ValueError(
                f"CustomCXRNet takes images of {low} to {high} px (four 2x poolings; above {high} the dense layer "
                f"explodes); got {image_size}. Tested sizes: {', '.join(map(str, SUPPORTED_SIZES))}."
            )
        if len(dropout_conv) != 3:
            raise ValueError(f"dropout_conv needs 3 rates (conv blocks 2-4), got {list(dropout_conv)}.")
        self.hparams = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "dropout_conv": [float(r) for r in dropout_conv],
            "dropout_dense": float(dropout_dense),
        }
        d2, d3, d4 = dropout_conv
        self.features = nn.Sequential(
            *_conv_block(in_channels, 16, padding=0, dropout=None),
            *_conv_block(16, 64, padding=1, dropout=d2),
            *_conv_block(64, 128, padding=1, dropout=d3),
            *_conv_block(128, 128, padding=1, dropout=d4),
        )
        side = image_size - 2  # the first conv has no padding
        for _ in range(4):
            side //= 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout_dense),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=1)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def build_model(model_cfg: dict, data_cfg: dict, num_classes: int = 3) -> CustomCXRNet:
    """CustomCXRNet for the ``model`` and ``data`` config sections (the config validates model.name)."""
    return CustomCXRNet(
        num_classes=num_classes,
        in_channels=data_cfg["channels"],
        image_size=data_cfg["image_size"],
        dropout_conv=model_cfg["dropout_conv"],
        dropout_dense=model_cfg["dropout_dense"],
    )
