"""Test-only faults: a training run that pauses where a test kills it, and a disk that fills up."""

from __future__ import annotations

import builtins
import errno
import os
import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class BatchPause(pl.Callback):
    """Pauses training after batch ``batch`` of epoch ``epoch`` while the file ``hold`` exists,
    having written ``marker``: a test kills the run there, mid-epoch, at a known step.

    Without ``hold`` it changes nothing, so the rerun of the same command trains straight on.
    """

    def __init__(self, marker: str, hold: str, epoch: int = 1, batch: int = 1) -> None:
        self.marker, self.hold = Path(marker), Path(hold)
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        self.marker.write_text(f"{trainer.current_epoch} {trainer.global_step}\n")
        while self.hold.exists():
            time.sleep(0.05)


class FillingDisk:
    """Stands in for ``open`` in :mod:`vision_transfer.files`: one file being written gets
    ``room`` bytes, then every write fails with ENOSPC, as when the disk fills up mid-write.

    Args:
        nth: the n-th file opened is the one that fills the disk...
        name: ...or the first whose name contains this.
        room: bytes that still fit.
    """

    def __init__(self, nth: int | None = None, name: str | None = None, room: int = 1000) -> None:
        self.nth, self.name, self.room = nth, name, room
        self.opened = 0
        self.full_at: Path | None = None
        self.before: dict[Path, bytes] = {}  # the folder's other files when the disk filled up

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        self.opened += 1
        path = Path(path)
        if self.full_at is not None or not (self.opened == self.nth or (self.name and self.name in path.name)):
            return handle
        self.full_at = path
        self.before = {p: p.read_bytes() for p in path.parent.iterdir() if p.is_file() and p != path}
        return _FullAfter(handle, self.room)


class _FullAfter:
    def __init__(self, handle: Any, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        written = self.handle.write(data[: self.room])
        self.room -= written
        if written < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> _FullAfter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def lock_waiters(path: Path) -> set[int]:
    """Processes blocked waiting for the ``flock`` on ``path`` (from Linux's /proc/locks)."""
    inode = os.stat(path).st_ino
    waiting = re.compile(rf"->\s+FLOCK\s+\S+\s+\S+\s+(\d+)\s+[0-9a-f]+:[0-9a-f]+:{inode}\s")
    return {int(m[1]) for m in waiting.finditer(Path("/proc/locks").read_text())}


class LateCorruption(pl.Callback):
    """Cuts the first validation image short after epoch 1, once setup has checked every image,
    as a file that goes bad mid-run (a failing disk, a sync client rewriting it) would be."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            path = Path(trainer.datamodule.splits["val"].items[0])  # type: ignore[attr-defined]
            path.write_bytes(path.read_bytes()[:200])
