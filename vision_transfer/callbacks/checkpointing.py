"""Checkpoint files that are whole or absent (also when the disk fills up), and the one to resume from."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vision_transfer.errors import ConfigError
from vision_transfer.files import write_atomic

LAST_NAME = re.compile(r"last(-v\d+)?\.ckpt")  # ModelCheckpoint(save_last=True) names


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` (``save_last=True``) is the newest state at every save point.

    Since Lightning 2.6, ``save_last`` writes ``last.ckpt`` only at steps where a top-k checkpoint
    was saved too, so with a monitor it trails the best epoch and a resumed run repeats epochs.
    Here ``last.ckpt`` is written through public API only: at each validation end (where
    ``ModelCheckpoint`` saves) and at each training epoch end, once per step, with
    ``trainer.save_checkpoint``; the parent class keeps the best (top-k) checkpoints.

    Args:
        last_every_n_steps: also write ``last.ckpt`` every this many training steps, mid-epoch (a stopped run
            resumes there: a streamed dataset's position is part of it); None: at epoch and validation ends only.
        kwargs: ``ModelCheckpoint``'s.
    """

    _last_step = -1

    def __init__(self, *args: Any, last_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and last_every_n_steps < 1:
            raise ConfigError(f"last_every_n_steps={last_every_n_steps}: a number of steps >= 1, or None.")
        self.last_every_n_steps = last_every_n_steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.last_every_n_steps and trainer.global_step % self.last_every_n_steps == 0:
            self._write_last(trainer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not hasattr(self, "write_last"):  # setup runs again for test after fit
            self.write_last = bool(self.save_last)
            self.save_last = False  # the parent's (2.6) rule is replaced by _write_last

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._write_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._write_last(trainer)

    def _write_last(self, trainer: pl.Trainer) -> None:
        if not getattr(self, "write_last", False) or trainer.state.fn != "fit":
            return
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        if self._last_step == trainer.global_step or self.dirpath is None:
            return
        self._last_step = trainer.global_step
        path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(path, self.save_weights_only)
        self.last_model_path = path


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
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer(), "checkpoint", advice=self.advice)


def is_local_path(path: Any) -> bool:
    """A path on this machine's file system (not ``s3://``, ``gs://``, ...)."""
    text = str(path)
    return "://" not in text or text.startswith("file://")


def newest_last_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) in ``folders``."""
    found = [p for folder in folders if folder.is_dir() for p in folder.iterdir() if LAST_NAME.fullmatch(p.name)]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)
