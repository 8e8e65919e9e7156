"""The data side of ``vision-transfer export`` from a checkpoint, through the datamodule the checkpoint records
(its eval transform and preprocessing), read once for both users:

- ``--quantize int8``: calibration images from the checkpoint's own training split, the accuracy gate on its
  validation split;
- the model card: split sizes and class counts, and the val/test scores of the exported prediction graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vision_transfer.app.checkpoints import recorded_datamodule
from vision_transfer.checkpoint import CheckpointEntry, read_checkpoint
from vision_transfer.data.dataset import ImageDataset, collate_images
from vision_transfer.data.sources import Samples
from vision_transfer.data.transforms import Normalize, create_eval_transform
from vision_transfer.errors import ExportError
from vision_transfer.export.loading import Classifier
from vision_transfer.export.quantize import CALIBRATION_IMAGES, MAX_DROP, check_int8_options, int8_export

BATCH = 32


@dataclass
class CheckpointData:
    """A checkpoint read once, and the splits of the data it records (none when it records no datamodule)."""

    path: str
    entry: CheckpointEntry
    content: dict[str, Any]
    source: str | None = None  # the recorded datamodule, described
    splits: dict[str, Samples] = field(default_factory=dict)

    @classmethod
    def read(cls, checkpoint: str | Path) -> CheckpointData:
        entry, content = read_checkpoint(checkpoint)
        if not entry.datamodule:
            return cls(str(checkpoint), entry, content)
        datamodule = recorded_datamodule(entry)
        return cls(str(checkpoint), entry, content, datamodule.describe(), datamodule.prepare_splits())

    def batches(self, samples: Samples) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``samples`` through the checkpoint's eval transform, normalised: float32 NCHW batches and labels."""
        config = self.entry.data_config
        loader = DataLoader(ImageDataset(samples, create_eval_transform(config)), batch_size=BATCH,
                            collate_fn=collate_images)  # fmt: skip
        normalize = Normalize(config)
        with torch.inference_mode():
            for batch in loader:
                yield normalize(batch.images).numpy(), batch.labels.numpy()

    def calibration_samples(self, count: int = CALIBRATION_IMAGES, seed: int = 0) -> Samples:
        """``count`` training images drawn at random (seeded), in split order: what int8 calibrates on."""
        train = self.splits["train"]
        return train.take(np.sort(np.random.default_rng(seed).permutation(len(train))[:count]))


def quantize_checkpoint_export(
    data: CheckpointData,
    folder: str | Path,
    *,
    classifier: Classifier | None = None,
    runtimes: tuple[str, ...] = ("onnx",),
    tta: str | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    max_drop: float = MAX_DROP,
    allow_drop: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Add an int8 model per runtime of ``runtimes`` to ``folder`` (which holds the checkpoint's fp32 exports):
    ``onnx``: ``classifier.int8.onnx`` (:func:`~vision_transfer.export.quantize.int8_export`); ``torchscript``:
    ``classifier.int8.torchscript.pt`` of ``classifier`` with ``tta`` (:func:`~vision_transfer.export.
    quantize_torch.torch_int8_export`). Each is calibrated on :meth:`CheckpointData.calibration_samples` and
    gated on the whole validation split. Returns each runtime's report; a runtime whose gate refused has
    ``{"error": ...}`` instead, and the other runtimes still run (nothing already written is lost)."""
    check_int8_options(max_drop, calibration_images)
    if data.source is None:
        raise ExportError(
            f"{data.path}: int8 export calibrates and checks on the checkpoint's data, and it records no datamodule."
        )
    if not len(data.splits.get("val", ())):
        raise ExportError(f"{data.source}: no validation split to check the int8 model on.")
    chosen = data.calibration_samples(calibration_images, seed)
    calibration = [images for images, _ in data.batches(chosen)]
    validation = list(data.batches(data.splits["val"]))
    gates = {"onnx": lambda: int8_export(folder, calibration, validation, max_drop=max_drop, allow_drop=allow_drop)}
    if classifier is not None:
        from vision_transfer.export.quantize_torch import torch_int8_export

        gates["torchscript"] = lambda: torch_int8_export(folder, classifier, calibration, validation, tta=tta,
                                                         max_drop=max_drop, allow_drop=allow_drop)  # fmt: skip
    reports: dict[str, dict[str, Any]] = {}
    for runtime in runtimes:
        if runtime not in gates:
            raise ExportError(f"int8 {runtime}: the runtimes are onnx and torchscript (that one with the classifier).")
        try:
            reports[runtime] = {**gates[runtime](), "calibration_images": len(chosen)}
        except ExportError as e:
            reports[runtime] = {"error": str(e)}
    return reports


def checkpoint_model_card(
    data: CheckpointData, classifier: Classifier, folder: str | Path, files: dict[str, Any], *,
    tta: str | None = None, scores: bool = True, int8: dict[str, dict[str, Any]] | None = None,
) -> Path:  # fmt: skip
    """Rewrite ``folder``'s ``README.md`` with what the checkpoint records: the recipe, the calibration and,
    when it records its data, the class counts per split and (``scores``) the val/test scores of
    ``classifier``'s prediction graph (what the export holds)."""
    from vision_transfer.export.card import class_scores, write_model_card

    entry = data.entry
    sections: dict[str, Any] = {}
    if data.source is not None:
        names = entry.class_names
        counts = {
            name: classifier.kind.targets(torch.from_numpy(samples.labels), len(names)).sum(0).long().numpy()
            for name, samples in data.splits.items()
        }
        sections["data"] = {"source": data.source, "counts": counts}
    if data.source is not None and scores:
        graph = classifier.prediction_head(tta).eval()
        sections["scores"] = {}
        for split in ("val", "test"):
            if not len(data.splits.get(split, ())):
                continue
            logits, labels = [], []
            with torch.inference_mode():
                for images, target in data.batches(data.splits[split]):
                    logits.append(graph(torch.from_numpy(images)).numpy())
                    labels.append(target)
            thresholds = classifier.prediction.get("thresholds")
            sections["scores"][split] = class_scores(np.concatenate(logits), np.concatenate(labels), classifier.kind,
                                                     thresholds)  # fmt: skip
    return write_model_card(folder, classifier, files, settings=entry.settings, calibration=entry.calibration,
                            int8=int8, epoch=data.content.get("epoch"), **sections)  # fmt: skip
