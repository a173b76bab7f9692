"""The model a training checkpoint holds, rebuilt: one place for every reader (evaluation, the spool's replay of
a model upload, the tuning study's best model), so a new kind of checkpoint is learnt once.

A checkpoint is a dict of plain types (``torch.load(..., weights_only=True)`` reads it safely): a
:class:`CustomCXRNet` has ``model_hparams`` and ``model_state``; a cross-validation's fold ensemble
(``kind: ensemble``, written by ``selection/cv.py``) has ``model_hparams`` and one state per fold in ``members``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrtrack.models.cxrnet import CustomCXRNet
from cxrtrack.models.ensemble import Ensemble


def model_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The model of a loaded checkpoint, in eval mode (raises KeyError/RuntimeError on one it cannot read)."""
    if ckpt.get("kind") == "ensemble":
        members = []
        for state in ckpt["members"]:
            members.append(CustomCXRNet(**ckpt["model_hparams"]))
            members[-1].load_state_dict(state)
        return Ensemble(members).eval()
    model = CustomCXRNet(**ckpt["model_hparams"])
    model.load_state_dict(ckpt["model_state"])
    return model.eval()


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of the checkpoint file ``checkpoint`` on ``device``, in eval mode."""
    ckpt = torch.load(checkpoint, map_location=device, weights_only=True)
    return model_from_checkpoint(ckpt).to(device).eval()
