"""Training on a prepared, streamed dataset whose images carry their own index; used by tests/test_streaming.py.

Usage: python tests/stream_run.py PREPARED OUT_DIR DEVICES WORKERS [HOLD]. Every training batch's sample indices are
appended to OUT_DIR/seen-rank<N>.txt as ``epoch step index index ...`` (read from the pixels). With
HOLD, rank 0 pauses after the 3rd step of epoch 0 while that file exists (a test kills it there);
a checkpoint is saved after every step, and a rerun resumes from OUT_DIR/ckpt/last.ckpt when it exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_model
from tests.fault_helpers import BatchPause
from vision_transfer.backbones import preprocessing
from vision_transfer.datamodules import PreparedDataModule


def indices(images: torch.Tensor, model: Any) -> list[int]:
    """The index each constant-colour image encodes (red + 256 * green), read from its normalised pixels."""
    pixels = model.normalize.to_uint8(images)[:, :2, 0, 0].long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


class SeenLog(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        seen = " ".join(map(str, indices(batch.images, pl_module)))
        with (self.out / f"seen-rank{trainer.global_rank}.txt").open("a") as f:
            f.write(f"{trainer.current_epoch} {trainer.global_step} {seen}\n")


def main() -> None:
    prepared, out, devices, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    hold = sys.argv[5] if len(sys.argv) > 5 else None
    pl.seed_everything(0)
    config = preprocessing(TINY_BACKBONE, "none", TINY_SIZE)
    data = PreparedDataModule(prepared, data_config=config, batch_size=8, num_workers=workers, augment=False)
    model = tiny_model(data, mode="full", lr=0.01, warmup_epochs=0)
    callbacks: list[pl.Callback] = [SeenLog(out)]
    last = out / "ckpt" / "last.ckpt"
    if hold is not None:
        callbacks += [
            BatchPause(str(out / "paused"), hold, epoch=0, batch=2),
            pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=1),
        ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=hold is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=out,
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=str(last) if last.exists() else None, weights_only=False)


if __name__ == "__main__":
    main()
