"""Checkpoint files that are whole or absent (also when the disk fills up), and the one to resume from."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vision_transfer.files import write_atomic

LAST_NAME = re.compile(r"last(-v\d+)?\.ckpt")  # ModelCheckpoint(save_last=True) names


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` (``save_last=True``) is the newest state at every save point.

    Since Lightning 2.6, ``save_last`` writes ``last.ckpt`` only at steps where a top-k checkpoint
    was saved too, so with a monitor it trails the best epoch and a resumed run repeats epochs.
    Here it is also written when the monitored metric did not improve, as before 2.6.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_skipped(trainer)

    def _save_last_if_skipped(self, trainer: pl.Trainer) -> None:
        # skipped as well when this step is already saved, i.e. when ModelCheckpoint wrote last.ckpt itself
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each local checkpoint to a temporary file beside it, fsyncs it and renames it over
    the old one; other file systems (``s3://`` ...) keep Lightning's own writer.

    Lightning's writer stages the file in the system temp folder and moves it into place, which
    copies (non-atomically, into the target) when that folder is on another disk. Here a full
    disk raises :class:`~vision_transfer.errors.DiskFullError`, naming the file, the free space
    and the intact previous checkpoint. It serves every ``trainer.save_checkpoint``:
    ``ModelCheckpoint``'s best and last files and direct calls alike.

    Args:
        advice: what to do after a full disk, appended to that error's message.
    """

    def __init__(self, advice: str = "") -> None:
        super().__init__()
        self.advice = advice

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer(), "checkpoint", advice=self.advice)


def newest_last_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) in ``folders``."""
    found = [p for folder in folders if folder.is_dir() for p in folder.iterdir() if LAST_NAME.fullmatch(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)
