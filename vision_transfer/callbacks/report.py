"""RunReport: writes a run's plots, facts and ``summary.md`` into its log folder."""

from __future__ import annotations

import heapq
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytorch_lightning as pl
import torch

from vision_transfer.report.run import (
    draw_plots,
    update_run_facts,
    write_average_precision,
    write_confusion,
    write_run_summary,
)

if TYPE_CHECKING:
    from vision_transfer.evaluation.kinds import TaskKind


class RunReport(pl.Callback):
    """Keeps the run folder readable without any tool but a browser.

    After fit: ``curves.png`` (loss, accuracy, learning rates), ``run.json`` (settings, sizes,
    timing) and ``summary.md``. After test: ``confusion_matrix.png``/``.csv``,
    ``per_class.csv``/``per_class_accuracy.png``, ``worst_test_images.png`` and the test metrics
    in ``run.json`` and ``summary.md``. ``vision-transfer report <run-dir>`` redraws them.

    Args:
        worst_images: how many of the test images with the highest loss to draw (0: none). Under
            DDP each rank sees its own shard; rank zero draws from its own.
    """

    def __init__(self, worst_images: int = 16) -> None:
        self.worst_images = worst_images
        self.files: list[Path] = []
        self._fit_start = 0.0
        self._train_images = 0
        self._worst: list[tuple[float, int, np.ndarray, list[int], list[int]]] = []

    def _folder(self, trainer: pl.Trainer) -> Path | None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.global_rank != 0 or not log_dir:
            return None
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- fit -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._train_images = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_images += len(batch[1])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = self._folder(trainer)
        if folder is None:
            return
        for logger in trainer.loggers:
            logger.save()
        seconds = time.perf_counter() - self._fit_start
        datamodule: Any = getattr(trainer, "datamodule", None)
        splits = getattr(datamodule, "splits", {}) or {}
        update_run_facts(
            folder,
            model=_model_facts(pl_module),
            data={
                "source": datamodule.describe() if hasattr(datamodule, "describe") else type(datamodule).__name__,
                "classes": len(getattr(pl_module, "class_names", None) or []),
                "samples": {split: len(samples) for split, samples in splits.items()},
                "batch_size": getattr(datamodule, "batch_size", None),
            },
            fit={
                "seconds": round(seconds, 1),
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "precision": str(trainer.precision),
                "devices": trainer.num_devices,
                "train_images_per_s": round(self._train_images * trainer.world_size / max(seconds, 1e-9), 1),
                "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or None,
            },
        )
        self.files.extend(draw_plots(folder, only=("curves",)))
        self.files.append(write_run_summary(folder))

    # -- test ------------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._worst = []

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, labels = batch[0], batch[1]
        if self.worst_images <= 0 or not isinstance(outputs, torch.Tensor) or images.ndim != 4:
            return
        kind = cast("TaskKind", pl_module.task_kind)
        losses = kind.sample_losses(outputs, labels)
        # the classes the metrics and predict count (post-hoc adjustment and thresholds applied), not the raw argmax
        probs = kind.probabilities(pl_module.prediction_logits(outputs))  # type: ignore[operator]
        predicted = kind.class_lists(kind.decide(probs, pl_module.thresholds))  # type: ignore[arg-type]
        truth = kind.class_lists(labels)
        top = torch.topk(losses, min(self.worst_images, len(losses))).indices
        for i, pixels in zip(top.tolist(), _to_uint8(images[top], pl_module), strict=True):
            true, pred = truth[i], predicted[i]
            item = (float(losses[i]), batch_idx * len(labels) + i, pixels, true, pred)
            if len(self._worst) < self.worst_images:
                heapq.heappush(self._worst, item)
            elif item[0] > self._worst[0][0]:
                heapq.heapreplace(self._worst, item)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scores = getattr(pl_module, "test_scores", None)
        if scores is None or not scores.update_count:
            return
        scores.thresholds.copy_(pl_module.thresholds)  # type: ignore[operator]
        values = scores.compute()  # every rank joins the gather; the module logs and resets them after
        folder = self._folder(trainer)
        if folder is None:
            return
        names = [str(n) for n in (getattr(pl_module, "class_names", None) or [])]
        if "confusion_matrix" in values:
            write_confusion(folder, values["confusion_matrix"].numpy(), names)
            self.files.extend(draw_plots(folder, only=("confusion", "per_class")))
        else:
            write_average_precision(folder, values["ap_per_class"].numpy(), names, values["positives"].numpy())
            self.files.extend(draw_plots(folder, only=("per_class",)))
        if self._worst:
            from vision_transfer.report.plots import plot_image_grid

            def show(classes: list[int]) -> str:
                return ";".join(names[c] for c in classes) or "none"

            worst = sorted(self._worst, key=lambda w: w[0], reverse=True)
            titles = [f"true {show(t)}\npred {show(p)} ({loss:.1f})" for loss, _, _, t, p in worst]
            out = plot_image_grid([w[2] for w in worst], titles, folder / "worst_test_images.png")
            self.files.append(out)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        folder = self._folder(trainer)
        if folder is None or not metrics:
            return
        update_run_facts(folder, test=metrics)
        if (folder / "run.json").is_file():
            self.files.append(write_run_summary(folder))


def _model_facts(pl_module: pl.LightningModule) -> dict[str, Any]:
    hp = dict(pl_module.hparams)
    facts = {k: hp.get(k) for k in ("backbone", "mode", "image_size", "optimizer", "lr", "head_lr", "layer_decay")}
    facts["initial_weights"] = getattr(pl_module, "weights_source", {}).get("kind")
    facts["parameters"] = sum(p.numel() for p in pl_module.parameters())
    return facts


def _to_uint8(images: torch.Tensor, pl_module: pl.LightningModule) -> np.ndarray:
    """Normalised NCHW batch -> NHWC uint8, undoing the module's normalisation."""
    normalize = getattr(pl_module, "normalize", None)
    if images.dtype != torch.uint8 and normalize is not None:
        images = normalize.to_uint8(images)
    return images.permute(0, 2, 3, 1).cpu().numpy()
