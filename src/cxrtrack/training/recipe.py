"""The training recipe's switches that live inside the training step (docs/model-quality.md).

A :class:`Recipe` is built from the whole config and handed to the :class:`~cxrtrack.training.trainer.Trainer`,
which calls it at a few fixed points; with every switch off it changes nothing:

- ``train_batch``: MixUp / CutMix of the batch (torchvision v2) and the channels-last memory format;
- ``autocast``: bf16 autocast of the forward pass (``training.precision``);
- ``train_module``: the module the training step calls (``torch.compile`` of the model when asked);
- ``after_step`` / ``after_epoch``: weight averaging with torch's ``AveragedModel``: an exponential
  moving average updated after every optimiser step (``ema``), or stochastic weight averaging of the
  epochs after ``swa_start`` with ``SWALR`` (``swa``);
- ``weights``: the module whose weights are validated and checkpointed: the averaged one when averaging
  is on (the raw weights are never checkpointed then);
- ``predictor``: ``weights`` wrapped for flip test-time augmentation (``evaluation.tta``), used for
  validation, the test report and the logged model alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from cxrtrack.models.ensemble import with_tta

if TYPE_CHECKING:
    from torch.optim.swa_utils import SWALR, AveragedModel

log = logging.getLogger(__name__)


def ema_avg_fn(decay: float):
    """EMA update with the usual warm-up: the decay is min(decay, (1 + n) / (10 + n)) after n updates, so the
    average is not dominated by the random initial weights during the first epochs."""
    def avg_fn(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged * d + current * (1.0 - d)

    return avg_fn


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these (private) probes: read the CPU flags
        try:
            flags = open("/proc/cpuinfo").read()  # noqa: SIM115
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``training.precision`` on ``device``: ``auto`` is bf16 on a CPU with native bf16, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def resolved_settings(cfg: dict[str, Any], device: torch.device) -> dict[str, str]:
    """What the ``auto`` settings became on this machine (tracked beside the config as ``resolved.*``)."""
    from cxrtrack.data.loading import resolve_pipeline
    from cxrtrack.threads import resolved_threads

    return {"pipeline": resolve_pipeline(cfg["data"], device),
            "precision": resolve_precision(cfg["training"]["precision"], device), **resolved_threads()}


class Recipe:
    """The in-step switches of one run. ``Recipe()`` (no config) is the plain training step."""

    def __init__(self, cfg: dict[str, Any] | None = None, num_classes: int = 3):
        train = (cfg or {}).get("training", {})
        self.averaging: str = train.get("weight_averaging", "none")
        self.ema_decay: float = train.get("ema_decay", 0.99)
        self.swa_start: float = train.get("swa_start", 0.75)
        self.swa_lr: float = train.get("swa_lr", 5e-4)
        self.channels_last: bool = bool(train.get("channels_last", False))
        self.compile: bool = bool(train.get("compile", False))
        self.precision: str = train.get("precision", "fp32")  # "auto" is resolved in attach, for the device
        self.tta: str = (cfg or {}).get("evaluation", {}).get("tta", "none")
        self.mix = None
        if cfg is not None:
            from cxrtrack.data.transforms import build_mix

            self.mix = build_mix(cfg["data"], num_classes)
        self.model: nn.Module | None = None
        self.averaged: AveragedModel | None = None
        self.swa_scheduler: SWALR | None = None
        self.swa_start_epoch: int | None = None
        self._train_module: nn.Module | None = None
        self.device_type = "cpu"

    # -- set-up (Trainer.__init__) ------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int, device: torch.device) -> None:
        from torch.optim.swa_utils import SWALR, AveragedModel

        self.model, self.device_type = model, device.type
        self.precision = resolve_precision(self.precision, device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._train_module = model
        if self.compile:
            # torch.compile of a module is an OptimizedModule, a module (its annotation says only "a callable")
            self._train_module = cast(nn.Module, torch.compile(model))
        if self.averaging == "ema":
            self.averaged = AveragedModel(model, avg_fn=ema_avg_fn(self.ema_decay), use_buffers=True)
        elif self.averaging == "swa":
            self.averaged = AveragedModel(model)
            self.swa_start_epoch = int(math.floor(self.swa_start * epochs)) + 1
            self.swa_scheduler = SWALR(optimizer, swa_lr=self.swa_lr,
                                       anneal_epochs=max(1, min(5, epochs - self.swa_start_epoch)),
                                       anneal_strategy="cos")

    # -- the training step --------------------------------------------------------------------------
    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("Recipe.attach(model, ...) has not been called")
        return self.model

    def train_module(self) -> nn.Module:
        return self._train_module if self._train_module is not None else self._model()

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): targets are the labels, or soft labels after MixUp / CutMix."""
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def after_step(self) -> None:
        if self.averaging == "ema" and self.averaged is not None:
            self.averaged.update_parameters(self._model())

    def after_epoch(self, epoch: int, train_loader=None) -> bool:
        """End of an epoch's training, before validation. True when SWA now drives the learning rate (the
        trainer then does not step its own scheduler)."""
        averaged, scheduler, start = self.averaged, self.swa_scheduler, self.swa_start_epoch
        if self.averaging != "swa" or averaged is None or scheduler is None or start is None or epoch < start:
            return False
        model = self._model()
        averaged.update_parameters(model)
        if train_loader is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            from torch.optim.swa_utils import update_bn

            update_bn(train_loader, averaged, device=next(model.parameters()).device)
        scheduler.step()
        return True

    # -- what is evaluated and checkpointed ---------------------------------------------------------
    @property
    def weights_kind(self) -> str:
        """``raw``, ``ema`` or ``swa``: which weights :meth:`weights` returns now."""
        if self.averaged is None or int(self.averaged.n_averaged) == 0:
            return "raw"
        return self.averaging

    def weights(self) -> nn.Module:
        """The module whose weights are validated and checkpointed."""
        if self.averaged is not None and self.weights_kind != "raw":
            return self.averaged.module
        return self._model()

    def predictor(self, module: nn.Module | None = None) -> nn.Module:
        """``module`` (default: :meth:`weights`) as it predicts: with flip TTA when ``evaluation.tta`` asks."""
        return with_tta(module if module is not None else self.weights(), self.tta)
