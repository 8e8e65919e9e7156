"""Errors that name the file or setting at fault; the CLI prints them without a traceback."""

from __future__ import annotations


class VisionTransferError(Exception):
    """Base class: a problem with the user's input or environment, explained in its message."""


class ConfigError(VisionTransferError, ValueError):
    """A setting out of range or inconsistent with another one."""


class UnknownBackboneError(VisionTransferError, ValueError):
    """A backbone name timm does not know."""


class UnsupportedBackboneError(VisionTransferError):
    """A backbone the requested tuning mode cannot train correctly (refused rather than trained wrong)."""


class WeightsError(VisionTransferError):
    """Weights that cannot be found, loaded or fitted to the backbone."""


class DataError(VisionTransferError):
    """A dataset, CSV or split that cannot be used as given."""


class ImageLoadError(DataError):
    """An image file that cannot be decoded; ``reason`` is the message without the path."""

    def __init__(self, path: object, reason: str | None = None) -> None:
        if reason is None:  # one message: how torch re-raises an error from a DataLoader worker
            super().__init__(str(path))
            self.path, self.reason = "", str(path)
            return
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class CheckpointError(WeightsError):
    """A file that is not a vision-transfer checkpoint, or one that does not fit the model or data."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs more than tensors and plain containers to load."""


class CacheError(VisionTransferError):
    """A feature cache that is missing, incomplete or does not match what it is used with."""


class ExportError(VisionTransferError):
    """An export that cannot be written or does not reproduce the PyTorch outputs."""


class DiskFullError(VisionTransferError):
    """A write that ran out of disk space (or quota); the file it was replacing is intact."""


class GpuMemoryError(VisionTransferError):
    """The accelerator ran out of memory; the message says which settings to lower."""


def out_of_memory_message(
    batch_size: int | None,
    batch_flag: str,
    accumulate: int | None = None,
    precision_flag: str | None = None,
    last_checkpoint: str | None = None,
) -> str:
    """One line for a GPU out-of-memory error: the batch size it happened at and what to change.

    Args:
        batch_size: the batch size that did not fit.
        batch_flag: the option that sets it.
        accumulate: training: the current gradient accumulation, doubled in the advice.
        precision_flag: an option that halves activation memory, when not already in use.
        last_checkpoint: training: the checkpoint to resume from.
    """
    tips = []
    if batch_size and batch_size > 1:
        tip = f"`{batch_flag} {batch_size // 2}`"
        if accumulate is not None:
            tip += f" (with `--trainer.accumulate_grad_batches {2 * accumulate}` to keep the effective batch size)"
        tips.append(tip)
    if precision_flag:
        tips.append(f"`{precision_flag}`")
    message = f"out of GPU memory at batch size {batch_size}" if batch_size else "out of GPU memory"
    if tips:
        message += f"; try {' or '.join(tips)}"
    if last_checkpoint:
        message += f"; the last checkpoint {last_checkpoint} is intact (add `--ckpt_path last` to resume)"
    return message + "."
