"""RunReport: writes a run's plots and per-class results into its log folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytorch_lightning as pl

from vision_transfer.report.plots import per_class_accuracy, plot_confusion_matrix, plot_training_curves


class RunReport(pl.Callback):
    """After fit: ``curves.png``. After test: ``confusion_matrix.png`` and ``per_class.csv``."""

    def __init__(self) -> None:
        self.files: list[Path] = []

    def _folder(self, trainer: pl.Trainer) -> Path | None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.global_rank != 0 or not log_dir:
            return None
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = self._folder(trainer)
        if folder is None:
            return
        for logger in trainer.loggers:
            logger.save()
        metrics = folder / "metrics.csv"
        if metrics.is_file() and (path := plot_training_curves(metrics, folder / "curves.png")):
            self.files.append(path)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        confusion = getattr(pl_module, "test_confusion", None)
        if confusion is None:
            return
        matrix = confusion.compute().cpu().numpy()  # every rank joins the sync
        confusion.reset()
        folder = self._folder(trainer)
        if folder is None:
            return
        names = list(getattr(pl_module, "class_names", None) or range(len(matrix)))
        self.files.append(plot_confusion_matrix(matrix, [str(n) for n in names], folder / "confusion_matrix.png"))
        with (folder / "per_class.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "support", "accuracy"])
            for name, support, acc in zip(names, matrix.sum(axis=1), per_class_accuracy(matrix), strict=True):
                writer.writerow([name, int(support), f"{acc:.4f}"])
        self.files.append(folder / "per_class.csv")
