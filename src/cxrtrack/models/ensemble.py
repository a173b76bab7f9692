"""Prediction-time wrappers: a fold ensemble and flip test-time augmentation, each one ``nn.Module``.

Both average *probabilities* (softmax outputs) and return their logarithm, so that

- ``softmax(wrapper(x))`` is exactly the averaged probability (log-softmax of a log-probability vector that
  sums to one is itself), and
- ``nn.CrossEntropyLoss`` applied to the output is the negative log-likelihood of the averaged
  prediction (with the same class weights and label smoothing as for a single model).

So everything that evaluates a model (validation, the test report, ``make evaluate``, the logged MLflow
model and its ``predict``) takes a wrapper in place of a plain :class:`CustomCXRNet` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _mean_log_prob(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log(mean_i softmax(logits_i)), computed stably with logsumexp."""
    stacked = torch.stack([torch.log_softmax(z.float(), dim=1) for z in logits])
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(logits)), device=stacked.device))


class FlipTTA(nn.Module):
    """Test-time augmentation: the model's softmax averaged over the image and its horizontal mirror."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_log_prob([self.model(x), self.model(torch.flip(x, dims=[-1]))])

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=1)


class Ensemble(nn.Module):
    """The fold models of a cross-validation as one model: the softmax averaged over its members."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_log_prob([m(x) for m in self.members])

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=1)


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """``model`` wrapped for ``evaluation.tta`` (``none`` returns it unchanged)."""
    return FlipTTA(model) if tta == "hflip" else model
