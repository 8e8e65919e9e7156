"""PredictionWriter: each predicted image's classes and probabilities, as CSV rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

if TYPE_CHECKING:
    from vision_transfer.evaluation.kinds import TaskKind


class PredictionWriter(BasePredictionWriter):
    """Writes a CSV row per predicted image.

    Single-label: ``path, label_1, prob_1, ..., label_k, prob_k`` (top k). The probabilities are
    the model's final ones: with a fitted temperature the columns are named ``calibrated_prob_k``,
    with test-time augmentation they are the views' average. Multi-label: ``path, labels,
    probabilities, all_probabilities``: every class at or above its threshold (``;``-separated),
    their probabilities, and every class's probability in class order.

    Args:
        output: CSV file; other ranks than 0 write ``<stem>.rank<N>.csv`` beside it.
        top_k: how many classes to list per image.
    """

    def __init__(self, output: str = "predictions.csv", top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.top_k = top_k
        self.path: Path | None = None
        self._file: Any = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.output)
        if trainer.global_rank:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("w", newline="")
        self._kind = cast("TaskKind", pl_module.task_kind)
        self._writer = csv.writer(self._file)
        calibrated = float(getattr(pl_module, "temperature", 1.0)) != 1.0
        num_classes = len(getattr(pl_module, "class_names", None) or [])
        self._writer.writerow(self._kind.csv_header(num_classes, self.top_k, calibrated))

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        files = trainer.datamodule.predict_files  # type: ignore[attr-defined]
        names: list[str] = getattr(pl_module, "class_names", None) or []
        thresholds = getattr(pl_module, "thresholds", torch.full((prediction.shape[1],), 0.5))
        paths = [files[index] for index in batch_indices]
        self._writer.writerows(self._kind.csv_rows(paths, prediction, names, thresholds, self.top_k))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
