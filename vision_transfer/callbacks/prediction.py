"""PredictionWriter: each predicted image's classes and probabilities, as CSV rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter


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
        names: list[str] = getattr(pl_module, "class_names", None) or []
        self._multilabel = bool(getattr(pl_module, "multilabel", False))
        self._writer = csv.writer(self._file)
        if self._multilabel:
            self._writer.writerow(["path", "labels", "probabilities", "all_probabilities"])
            return
        calibrated = float(getattr(pl_module, "temperature", 1.0)) != 1.0
        prob = "calibrated_prob" if calibrated else "prob"
        k = min(self.top_k, len(names) or self.top_k)
        self._writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", prob)])

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
        if self._multilabel:
            thresholds = getattr(pl_module, "thresholds", torch.full((prediction.shape[1],), 0.5)).cpu()
            for index, row in zip(batch_indices, prediction.float().cpu(), strict=True):
                above = (row >= thresholds).nonzero().flatten().tolist()
                self._writer.writerow(
                    [
                        files[index],
                        ";".join(names[c] for c in above),
                        ";".join(f"{float(row[c]):.5f}" for c in above),
                        ";".join(f"{float(v):.5f}" for v in row),
                    ]
                )
            return
        probs, classes = torch.topk(prediction.float(), min(self.top_k, prediction.shape[1]), dim=1)
        for index, p_row, c_row in zip(batch_indices, probs.tolist(), classes.tolist(), strict=True):
            cells: list[Any] = [files[index]]
            for p, c in zip(p_row, c_row, strict=True):
                cells += [names[c] if c < len(names) else c, f"{p:.5f}"]
            self._writer.writerow(cells)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
