"""The data side of ``vision-transfer export`` from a checkpoint, through the datamodule the checkpoint records
(its eval transform and preprocessing):

- ``--quantize int8``: calibration images from the checkpoint's own training split, the accuracy gate on its
  validation split;
- the model card: split sizes and class counts, and the val/test scores of the exported prediction graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vision_transfer.app.checkpoints import recorded_datamodule
from vision_transfer.checkpoint import read_checkpoint
from vision_transfer.data.dataset import ImageDataset, collate_images
from vision_transfer.data.sources import Samples
from vision_transfer.data.transforms import Normalize, create_eval_transform
from vision_transfer.errors import CheckpointError, ExportError
from vision_transfer.export.quantize import CALIBRATION_IMAGES, MAX_DROP, check_int8_options, int8_export

BATCH = 32


def normalised_batches(
    samples: Samples, normalize: Normalize, transform: Any
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    loader = DataLoader(ImageDataset(samples, transform), batch_size=BATCH, collate_fn=collate_images)
    with torch.inference_mode():
        for batch in loader:
            yield normalize(batch.images).numpy(), batch.labels.numpy()


def quantize_checkpoint_export(
    checkpoint: str | Path,
    folder: str | Path,
    *,
    calibration_images: int = CALIBRATION_IMAGES,
    max_drop: float = MAX_DROP,
    allow_drop: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Add ``classifier.int8.onnx`` to ``folder`` (which holds the checkpoint's fp32 ONNX export):
    calibrated on ``calibration_images`` training images drawn at random (seeded), gated on the whole
    validation split (:func:`~vision_transfer.export.quantize.int8_export`)."""
    check_int8_options(max_drop, calibration_images)
    entry, _ = read_checkpoint(checkpoint)
    try:
        datamodule = recorded_datamodule(entry)
    except CheckpointError as e:
        raise ExportError(f"{checkpoint}: int8 export calibrates and checks on the checkpoint's data, and {e}") from e
    splits = datamodule.prepare_splits()
    if "val" not in splits or not len(splits["val"]):
        raise ExportError(f"{datamodule.describe()}: no validation split to check the int8 model on.")
    config = entry.data_config
    transform, normalize = create_eval_transform(config), Normalize(config)
    train = splits["train"]
    chosen = np.sort(np.random.default_rng(seed).permutation(len(train))[:calibration_images])
    calibration = (images for images, _ in normalised_batches(train.take(chosen), normalize, transform))
    validation = normalised_batches(splits["val"], normalize, transform)
    report = int8_export(folder, calibration, validation, max_drop=max_drop, allow_drop=allow_drop)
    return {**report, "calibration_images": len(chosen)}


def checkpoint_model_card(
    checkpoint: str | Path, folder: str | Path, files: dict[str, Any], *, tta: str | None = None,
    scores: bool = True, int8: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Rewrite ``folder``'s ``README.md`` with what the checkpoint records: the recipe, the calibration and,
    when it records its data, the class counts per split and (``scores``) the val/test scores of the
    prediction graph the export holds."""
    from vision_transfer.export import load_classifier
    from vision_transfer.export.card import class_scores, write_model_card

    entry, content = read_checkpoint(checkpoint)
    classifier = load_classifier(checkpoint)
    data: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    if entry.datamodule:
        datamodule = recorded_datamodule(entry)
        splits = datamodule.prepare_splits()
        names = entry.class_names
        counts = {
            name: classifier.kind.targets(torch.from_numpy(samples.labels), len(names)).sum(0).long().numpy()
            for name, samples in splits.items()
        }
        data = {"source": datamodule.describe(), "counts": counts}
        if scores:
            graph = classifier.prediction_head(tta).eval()
            transform, normalize = create_eval_transform(entry.data_config), Normalize(entry.data_config)
            measured = {}
            for split in ("val", "test"):
                if split not in splits or not len(splits[split]):
                    continue
                logits, labels = [], []
                with torch.inference_mode():
                    for images, target in normalised_batches(splits[split], normalize, transform):
                        logits.append(graph(torch.from_numpy(images)).numpy())
                        labels.append(target)
                measured[split] = class_scores(np.concatenate(logits), np.concatenate(labels), classifier.kind,
                                               classifier.prediction.get("thresholds"))  # fmt: skip
    return write_model_card(folder, classifier, files, settings=entry.settings, data=data, scores=measured,
                            calibration=entry.calibration, int8=int8, epoch=content.get("epoch"))  # fmt: skip
