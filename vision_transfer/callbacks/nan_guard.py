"""StopOnNonFiniteLoss: stops training on a NaN or infinite loss before the step uses its gradients."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from vision_transfer.errors import VisionTransferError


class StopOnNonFiniteLoss(pl.Callback):
    """Raises a one-line :class:`VisionTransferError` (step, epoch, the last good checkpoint, what to try)
    when a training loss is NaN or infinite, before the optimizer step that would use its gradients.

    On CUDA each loss's finiteness is copied to the host asynchronously when its backward starts and
    read just before the optimizer step, so the check never waits for the backward pass.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, torch.Tensor, Any]] = []  # (finite?, loss, CUDA event)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if finite.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, loss.detach(), event))
        else:
            self._pending.append((finite, loss.detach(), None))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        pending, self._pending = self._pending, []
        for finite, loss, event in pending:
            if event is not None:
                event.synchronize()
            if not bool(finite):
                checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
                kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
                raise VisionTransferError(
                    f"training loss is {loss.item()} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
                    f"stopped before the weights took it, and {kept}. Try a lower lr/head_lr, a longer warmup, or "
                    "precision 32-true / bf16-mixed instead of 16-mixed."
                )
