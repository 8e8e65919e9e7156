"""OutOfMemoryAdvice: turns a GPU out-of-memory error into one line saying what to lower."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from vision_transfer.errors import out_of_memory_message

ADVICE = "vision_transfer_advice"  # the attribute the advice is attached to


class OutOfMemoryAdvice(pl.Callback):
    """Attaches advice (batch size, accumulation, precision, the intact last checkpoint) to a CUDA
    out-of-memory error, as ``error.vision_transfer_advice``; the command line prints it.

    Args:
        batch_flag: the option that sets the batch size, as the user writes it.
    """

    def __init__(self, batch_flag: str = "--data.init_args.batch_size") -> None:
        self.batch_flag = batch_flag

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.cuda.OutOfMemoryError):
            return
        fitting = trainer.state.fn == "fit"
        datamodule: Any = getattr(trainer, "datamodule", None)
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") if fitting else ""
        message = out_of_memory_message(
            getattr(datamodule, "batch_size", None),
            self.batch_flag,
            accumulate=trainer.accumulate_grad_batches if fitting else None,
            precision_flag="--trainer.precision bf16-mixed" if "16" not in str(trainer.precision) else None,
            last_checkpoint=last or None,
        )
        setattr(exception, ADVICE, message)
