"""Mixed precision on CUDA (run by benchmarks/gpu_check.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE
from vision_transfer.datamodules import ImageFolderDataModule
from vision_transfer.tasks import ImageClassifier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
@pytest.mark.parametrize("mode", ["full", "gradual", "linear_probe"])
def test_mixed_precision_training_on_cuda(tmp_path: Path, image_folder: Path, precision: str, mode: str) -> None:
    model = ImageClassifier(TINY_BACKBONE, weights="none", image_size=TINY_SIZE, mode=mode, warmup_epochs=0)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, ImageFolderDataModule(str(image_folder), batch_size=8, num_workers=0))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert next(model.parameters()).device.type == "cuda"
