"""The training loop: one explicit loop for every tracker.

Per epoch: train (progress bar with live loss/accuracy), validate, hand one row of metrics (train/val
loss, accuracy, macro F1, learning rate, epoch time, images per second) to every logger, keep the best
checkpoint by the monitored validation metric, step the LR scheduler, write ``last.pt``, call every epoch
callback, and stop early when it stops improving. The loop knows nothing about trackers: logging to them
is a logger (called before any file of the epoch is written, so a full disk cannot keep an epoch from the
trackers), Optuna's pruning a callback (called after the epoch's files, so a pruned trial keeps them). A
callback may raise :class:`StopTraining` to end the loop early but successfully.
Ctrl-C stops after the current batch: the run is marked KILLED and the best checkpoint is kept. Any other
exception ends the loop as FAILED with the history and best checkpoint kept, so the caller can hand them
to the trackers before re-raising it.
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxrtrack import CLASS_NAMES, signals
from cxrtrack.errors import NonFiniteLossError
from cxrtrack.signals import Terminated
from cxrtrack.tracking import FAILED, FINISHED, KILLED
from cxrtrack.training.metrics import epoch_metrics, recall_per_class
from cxrtrack.training.recipe import Recipe
from cxrtrack.utils import atomic_write

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after every epoch with the epoch number (1-based) and its row of metrics."""


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Raised by an epoch callback to end training early, like early stopping (e.g. a pruned trial)."""


@dataclass
class EvalOutput:
    loss: float
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int | None
    best_score: float | None
    status: str  # FINISHED, KILLED (Ctrl-C) or FAILED (an exception; see ``error``)
    stopped_early: bool
    checkpoint: Path
    best_metrics: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    stop_reason: str | None = None  # why training ended before the last epoch (early stopping, a callback)
    val_output: EvalOutput | None = None  # the selected epoch's validation predictions (not kept across a resume)
    unsaved: tuple[Path, int] | None = None  # the checkpoint file (and its epoch) whose write failed (``error``)


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = cfg["optimizer"], cfg["lr"], cfg["weight_decay"]
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg["momentum"], weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any]) -> LRScheduler | None:
    name = cfg["scheduler"]
    if name == "plateau":
        # Same notion of "improved" as checkpointing and early stopping: an absolute min_delta.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=cfg["monitor_mode"], factor=cfg["scheduler_factor"], patience=cfg["scheduler_patience"],
            threshold=cfg["min_delta"], threshold_mode="abs",
        )
    warmup = cfg.get("warmup_epochs", 0)
    main: LRScheduler
    if name == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"] - warmup)
    elif name == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["scheduler_step_size"],
                                               gamma=cfg["scheduler_factor"])
    elif warmup:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        return None
    if not warmup:
        return main
    # linear warm-up from lr / (warmup + 1) to lr over `warmup` epochs, then the schedule (cosine over the rest)
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def balanced_class_weights(labels: list[int], n_classes: int = 3) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced set gets weight 1 per class (sklearn's 'balanced')."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device, criterion: nn.Module) -> EvalOutput:
    """Loss (the training criterion, so class weights count the same way), labels and probabilities."""
    model.eval()
    total_loss, seen, y_true, probs = 0.0, 0, [], []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += criterion(logits, labels).item() * len(labels)
        seen += len(labels)
        y_true.append(labels.cpu())
        probs.append(torch.softmax(logits, 1).cpu())
    p = torch.cat(probs).numpy()
    return EvalOutput(total_loss / max(seen, 1), torch.cat(y_true).numpy(), p.argmax(1), p)


def build_criterion(train_cfg: dict[str, Any], train_labels: list[int], device: torch.device) -> nn.Module:
    """Cross-entropy, with balanced class weights from the train split when ``class_weights: balanced``."""
    weights = balanced_class_weights(train_labels) if train_cfg["class_weights"] == "balanced" else None
    return nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                               label_smoothing=train_cfg.get("label_smoothing", 0.0))


def _numpy_state() -> list[Any]:
    """NumPy's global RNG state as plain types and a tensor (``torch.load(weights_only=True)`` refuses arrays)."""
    state = np.random.get_state(legacy=True)  # legacy, the default: the global MT19937 generator's state tuple
    assert isinstance(state, tuple)  # the dict form is only for legacy=False
    kind, keys, pos, has_gauss, gauss = state
    return [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)]


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loaders: dict[str, Any],  # train, val (None: no validation split), test: DataLoaders or DeviceLoaders
        cfg: dict[str, Any],
        device: torch.device,
        checkpoint_path: Path,
        checkpoint_extra: dict[str, Any] | None = None,
        criterion: nn.Module | None = None,
        callbacks: Sequence[EpochCallback] = (),
        recipe: Recipe | None = None,
        loggers: Sequence[EpochCallback] = (),
    ):
        self.model = model.to(device)
        self.loaders = loaders
        self.cfg = cfg  # the `training` section
        self.callbacks = list(callbacks)  # after the epoch's files (best.pt, last.pt) are written
        self.loggers = list(loggers)  # before them: the trackers' metrics never wait on the local disk
        self.device = device
        self.checkpoint_path = Path(checkpoint_path)
        self.checkpoint_extra = checkpoint_extra or {}
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.monitor, self.mode = cfg["monitor"], cfg["monitor_mode"]
        self.best_epoch: int | None = None
        self.recipe = recipe if recipe is not None else Recipe()  # EMA/SWA, mixup, TTA, speed options
        self.recipe.attach(self.model, self.optimizer, cfg["epochs"], device)
        # last.pt, beside best.pt: everything needed to continue after the last complete epoch (--resume)
        self.last_path = self.checkpoint_path.with_name("last.pt")
        self.resume_from: dict[str, Any] | None = None  # a loaded last.pt: fit() continues after its epoch
        self.unsaved: tuple[Path, int] | None = None  # the checkpoint whose write failed, with its epoch

    def _write(self, path: Path, state: dict[str, Any]) -> None:
        """``state`` to ``path`` atomically (a temporary file renamed into place, removed if the write fails). A
        failed write (a full disk) is remembered with its file and epoch, so the run names the file that failed."""
        # Serialised in memory first: torch.save writing to a full disk fails with an opaque RuntimeError
        # ("unexpected pos"), a plain file write with OSError(ENOSPC) that says what happened.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        try:
            atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))  # never half-written
        except OSError:
            self.unsaved = (path, int(state["epoch"]))
            raise

    # -- one pass ---------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        total_loss, seen, correct, y_true, y_pred = 0.0, 0, 0, [], []
        start = time.perf_counter()
        # a bar on a terminal only (disable=None); in a log file or CI the one line per epoch below is the progress
        bar = tqdm(self.loaders["train"], desc=f"epoch {epoch}/{self.cfg['epochs']}", unit="batch", leave=False,
                   disable=None)
        for batch, (images, labels) in enumerate(bar, 1):
            with signals.critical():  # Ctrl-C / SIGTERM: this batch finishes, then the loop stops
                images, labels = images.to(self.device), labels.to(self.device)
                images, targets = self.recipe.train_batch(images, labels)
                self.optimizer.zero_grad(set_to_none=True)
                with self.recipe.autocast():
                    logits = self.recipe.train_module()(images)
                    loss = self.criterion(logits.float(), targets)
                if not torch.isfinite(loss):  # before backward/step: the weights are still the last finite ones
                    raise self._non_finite("training loss", float(loss.item()), epoch, batch)
                loss.backward()
                if self.cfg["grad_clip_norm"]:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip_norm"])
                self.optimizer.step()
                self.recipe.after_step()
            preds = logits.argmax(1)
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            correct += int((preds == labels).sum())
            y_true.append(labels.cpu())
            y_pred.append(preds.cpu())
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        elapsed = time.perf_counter() - start
        metrics = epoch_metrics(torch.cat(y_true).numpy(), torch.cat(y_pred).numpy())
        return {"loss": total_loss / seen, **metrics, "images_per_s": seen / elapsed}

    def evaluate(self, loader: DataLoader) -> EvalOutput:
        """The weights that are checkpointed (averaged ones when EMA/SWA is on), predicting as configured (TTA)."""
        return evaluate_model(self.recipe.predictor(), loader, self.device, self.criterion)

    def _non_finite(self, what: str, value: float, epoch: int, batch: int | None = None) -> NonFiniteLossError:
        where = f"epoch {epoch}" + (f", batch {batch}" if batch else "")
        clip = self.cfg.get("grad_clip_norm")
        clipping = (f"gradients that explode despite clipping at {clip}" if clip
                    else "no gradient clipping (training.grad_clip_norm=null; try 5.0)")
        best = "of an earlier epoch is kept" if self.best_epoch else "was never written"
        return NonFiniteLossError(
            f"Training stopped at {where}: the {what} is {value} (not a finite number), so nothing after this point "
            f"can be trusted. Likely causes: a learning rate too high for this model (training.lr={self.cfg['lr']}; "
            f"try 10x lower), {clipping}, or inputs that overflow (check data.normalize_std). The run is marked "
            f"FAILED; the best checkpoint {best} (weights that are not finite are never saved)."
        )

    # -- the loop ---------------------------------------------------------------------------------
    def _improved(self, score: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(score)
        delta = self.cfg["min_delta"]
        return score < best - delta if self.mode == "min" else score > best + delta

    def save_checkpoint(self, epoch: int, score: float | None, metrics: dict[str, float]) -> None:
        """Write the best checkpoint atomically (a temporary file renamed into place, removed if the write fails,
        e.g. on a full disk); weights that are not finite are refused, never saved as "best"."""
        weights = self.recipe.weights().state_dict()  # the averaged weights when EMA/SWA is on
        bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise self._non_finite(f"model weights ({names})", float("nan"), epoch)
        state = {
            "model_state": weights,
            "weights": self.recipe.weights_kind,
            "model_hparams": getattr(self.model, "hparams", {}),
            "epoch": epoch,
            "monitor": self.monitor,
            "score": score,
            "metrics": metrics,
            **self.checkpoint_extra,
        }
        self._write(self.checkpoint_path, state)

    # -- resume ---------------------------------------------------------------------------------------
    def save_last(self, epoch: int, history: list[dict[str, float]], best: float | None, best_epoch: int | None,
                  best_metrics: dict[str, float], stale: int) -> None:
        """``last.pt``: weights, optimizer, scheduler, the loop's own state and every RNG state after ``epoch``, so
        that a resumed run continues exactly where this one stopped (the same shuffling and augmentation)."""
        train_loader = self.loaders["train"]
        generator = getattr(train_loader, "generator", None)
        state = {
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
            # the recipe's running averages (EMA/SWA weights, the SWA scheduler): a resumed run keeps averaging
            "averaged_state": self.recipe.averaged.state_dict() if self.recipe.averaged is not None else None,
            "swa_scheduler_state": (self.recipe.swa_scheduler.state_dict()
                                    if self.recipe.swa_scheduler is not None else None),
            "epoch": epoch, "history": history, "best": best, "best_epoch": best_epoch, "best_metrics": best_metrics,
            "stale": stale,
            "rng": {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state(),
                    "loader": generator.get_state() if generator is not None else None,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            **self.checkpoint_extra,
        }
        self._write(self.last_path, state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.scheduler is not None and state.get("scheduler_state") is not None:
            self.scheduler.load_state_dict(state["scheduler_state"])
        if self.recipe.averaged is not None and state.get("averaged_state") is not None:
            self.recipe.averaged.load_state_dict(state["averaged_state"])
        if self.recipe.swa_scheduler is not None and state.get("swa_scheduler_state") is not None:
            self.recipe.swa_scheduler.load_state_dict(state["swa_scheduler_state"])
        rng = state["rng"]
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
        generator = getattr(self.loaders["train"], "generator", None)
        if generator is not None and rng.get("loader") is not None:
            generator.set_state(rng["loader"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def fit(self) -> FitResult:
        history: list[dict[str, float]] = []
        best, best_epoch, best_metrics, stale = None, None, {}, 0
        status, stopped_early, stop_reason = FINISHED, False, None
        error: Exception | None = None
        best_val: EvalOutput | None = None
        patience = self.cfg["early_stopping_patience"]
        self.best_epoch = None
        self.unsaved = None
        first = 1
        if self.resume_from is not None:
            state = self.resume_from
            self._restore(state)
            history, best, best_epoch = list(state["history"]), state["best"], state["best_epoch"]
            best_metrics, stale, first = dict(state["best_metrics"]), state["stale"], state["epoch"] + 1
            self.best_epoch = best_epoch
            log.info("Resuming after epoch %d (best %s so far: %s at epoch %s).", state["epoch"], self.monitor,
                     f"{best:.4f}" if best is not None else "none", best_epoch)
        try:
            for epoch in range(first, self.cfg["epochs"] + 1):
                lr = self.optimizer.param_groups[0]["lr"]
                start = time.perf_counter()
                train = self.train_one_epoch(epoch)
                swa_lr = self.recipe.after_epoch(epoch, self.loaders["train"])
                val_metrics, val = {}, None
                if self.loaders.get("val") is not None:  # none: a retrain on all of train/ (the last epoch is kept)
                    val = self.evaluate(self.loaders["val"])
                    if not math.isfinite(val.loss):
                        raise self._non_finite("validation loss", val.loss, epoch)
                    val_metrics = {"loss": val.loss, **epoch_metrics(val.y_true, val.y_pred)}
                row = {
                    "epoch": epoch,
                    **{f"train/{k}": v for k, v in train.items() if k != "images_per_s"},
                    **{f"val/{k}": v for k, v in val_metrics.items()},
                    "lr": lr,
                    "epoch_time_s": time.perf_counter() - start,
                    "train/images_per_s": train["images_per_s"],
                }
                # The end of an epoch is one step: its row, checkpoint and tracker calls all happen, or none.
                with signals.critical():
                    history.append(row)
                    for logger in self.loggers:  # first: the metrics do not depend on any file of this epoch
                        logger(epoch, row)

                    score = row.get(self.monitor)  # None without validation: every epoch replaces the last
                    mark = ""
                    if score is None or self._improved(score, best):
                        self.save_checkpoint(epoch, score, row)
                        best, best_epoch, stale, mark = score, epoch, 0, " *best*"
                        best_metrics = {k: v for k, v in row.items() if k.startswith("val/")}
                        if val is not None:  # per-class recall of the selected epoch (cross-validation reports it)
                            best_metrics.update({f"val/{k}": v for k, v in
                                                 recall_per_class(val.y_true, val.y_pred, CLASS_NAMES).items()})
                        best_val = val
                        self.best_epoch = best_epoch
                    else:
                        stale += 1
                    log.info(
                        "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f f1 %.3f | lr %.2e "
                        "| %.1fs %.0f img/s%s",
                        epoch, self.cfg["epochs"], row["train/loss"], row["train/acc"], row.get("val/loss", math.nan),
                        row.get("val/acc", math.nan), row.get("val/f1_macro", math.nan), lr, row["epoch_time_s"],
                        row["train/images_per_s"], mark,
                    )
                    if swa_lr:
                        pass  # SWALR drives the learning rate from swa_start on
                    elif isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        assert score is not None  # settings refuse the plateau scheduler without a validation split
                        self.scheduler.step(score)
                    elif self.scheduler is not None:
                        self.scheduler.step()
                    self.save_last(epoch, history, best, best_epoch, best_metrics, stale)
                    for callback in self.callbacks:
                        callback(epoch, row)
                if patience and val_metrics and stale >= patience:
                    stop_reason = f"early stopping: {self.monitor} has not improved for {patience} epochs"
                    log.info("Early stopping: %s has not improved for %d epochs (best %.4f at epoch %d).",
                             self.monitor, patience, best, best_epoch)
                    stopped_early = True
                    break
        except StopTraining as stop:
            stopped_early, stop_reason = True, str(stop)
            log.info("Training stopped after epoch %d: %s.", len(history), stop)
        except KeyboardInterrupt as exc:
            status = KILLED
            how = f"Terminated ({exc})" if isinstance(exc, Terminated) else "Interrupted (Ctrl-C)"
            log.warning(
                "%s after %d complete epoch(s); the best checkpoint %s is kept.",
                how, len(history), self.checkpoint_path if best_epoch else "(none yet)",
            )
        except NonFiniteLossError as exc:
            status, error = FAILED, exc
            log.error("%s", exc)
        except Exception as exc:  # a crash (out of memory, disk full, ...): keep what was learnt so far
            status, error = FAILED, exc
            where = (f"writing {self.unsaved[0].name} at the end of epoch {self.unsaved[1]}" if self.unsaved
                     else f"in epoch {len(history) + 1}")
            log.error("Training failed %s (%s: %s); the best checkpoint so far is kept.",
                      where, type(exc).__name__, exc)
        return FitResult(history, best_epoch, best, status, stopped_early, self.checkpoint_path, best_metrics, error,
                         stop_reason, best_val, self.unsaved if error is not None else None)
