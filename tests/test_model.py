"""CustomCXRNet: the design's layers, every supported size, logits not probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrtrack.models import SUPPORTED_SIZES, CustomCXRNet


def expected_params(size: int, in_channels: int = 1) -> int:
    convs = (3 * 3 * in_channels + 1) * 16 + (3 * 3 * 16 + 1) * 64 + (3 * 3 * 64 + 1) * 128 + (3 * 3 * 128 + 1) * 128
    side = (size - 2) // 2 // 2 // 2 // 2
    return convs + (128 * side * side + 1) * 128 + (128 + 1) * 64 + (64 + 1) * 3


@pytest.mark.parametrize("size", SUPPORTED_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_supported_size_gives_three_logits(size, channels):
    model = CustomCXRNet(in_channels=channels, image_size=size).eval()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 3)
    assert model.num_parameters() == expected_params(size, channels)


def test_layers_follow_the_design():
    model = CustomCXRNet(image_size=128)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (16, (3, 3), (0, 0)), (64, (3, 3), (1, 1)), (128, (3, 3), (1, 1)), (128, (3, 3), (1, 1))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 4
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.30, 0.40, 0.25]
    dense = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [d.out_features for d in dense] == [128, 64, 3]
    assert not any(isinstance(m, nn.Softmax) for m in model.modules())


def test_forward_returns_logits_and_predict_proba_softmax():
    torch.manual_seed(0)
    model = CustomCXRNet(image_size=64).eval()
    x = torch.randn(4, 1, 64, 64) * 5
    logits = model(x)
    assert not torch.allclose(logits.sum(1), torch.ones(4))  # not probabilities
    torch.testing.assert_close(model.predict_proba(x), torch.softmax(logits, 1))


def test_dropout_rates_are_configurable():
    model = CustomCXRNet(image_size=64, dropout_conv=(0.1, 0.2, 0.3), dropout_dense=0.5)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.3, 0.5]
    assert model.hparams["dropout_conv"] == [0.1, 0.2, 0.3]


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="32 to 512 px.*got 16.*64, 128, 224, 256"):
        CustomCXRNet(image_size=16)
