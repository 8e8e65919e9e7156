"""A shifted test set: seeded corruptions of the test images at three severities, and the top-1 under them.

The corruptions act on the uint8 images the eval transform yields (at the model's input resolution,
before normalisation), so every dataset gets the same shifted copy of its own test split, and one
image index, corruption and severity always gives the same pixels.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Protocol

import albumentations as A
import cv2
import numpy as np
import torch

from vision_transfer.data.dataset import BatchModel, FeatureBatch, as_model_batch
from vision_transfer.errors import ConfigError

CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast", "rotation", "jpeg")
SEVERITIES: tuple[int, ...] = (1, 2, 3)

# Severities 1, 2, 3 of each corruption, from Hendrycks & Dietterich 2019's ``make_imagenet_c.py`` (ImageNet-C,
# 224 px) and ``make_cifar_c.py`` (CIFAR-10-C, 32 px), whose severities 1..5 are quoted; checked by eye on
# Fashion-MNIST at 32 and 64 px (``benchmarks/shift.py --examples``): level 1 visible, level 3 still recognisable.
# - gaussian_noise: std as a fraction of 255, per pixel and channel: ImageNet-C's severities 1, 3, 4 (its 5,
#   0.38, left a shirt at 64 px a cloud of coloured pixels).
# - gaussian_blur: sigma in pixels at 32 px, scaled by the input side / 32: CIFAR-10-C's severities 1, 3, 5.
#   At 224 px that is 2.8, 4.9, 7.0 px, near ImageNet-C's severities 3, 4, 5 (3, 4, 6 px); ImageNet-C's
#   sigmas scaled down instead leave its severities 1 and 2 under 0.3 px at 32 px, which changes nothing.
# - contrast: the share of contrast kept around the image mean: ImageNet-C's severities 1, 3, 4 (its 5, 0.05,
#   leaves 13 grey levels of 256). The mean is over all channels (ImageNet-C: per channel; the same on grey).
# - rotation: degrees, either way (a seeded sign). Not an ImageNet-C corruption; 15, 30 and 45 degrees go
#   from a tilted photo to a diagonal item, its corners cut by the frame and filled with black.
# - jpeg: JPEG quality: ImageNet-C's severities 1, 3, 5. Quality is not scaled: the 8x8 blocks already weigh
#   more on a small image (CIFAR-10-C's 80, 65, 40 are milder for that reason; at 64 px quality 7 is blocky
#   and still recognisable).
SEVERITY_PARAMETERS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.08, 0.18, 0.26),
    "gaussian_blur": (0.4, 0.7, 1.0),
    "contrast": (0.4, 0.2, 0.1),
    "rotation": (15.0, 30.0, 45.0),
    "jpeg": (25, 15, 7),
}
BLUR_REFERENCE_SIDE = 32  # the side the blur sigmas above are given at (CIFAR-10-C's)


def check_corruption(corruption: str, severity: int) -> None:
    """Refuse an unknown corruption or severity, naming it and the valid ones."""
    if corruption not in CORRUPTIONS:
        raise ConfigError(f"corruption {corruption!r} is not one of {', '.join(CORRUPTIONS)}.")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity {severity!r} is not one of {', '.join(map(str, SEVERITIES))}.")


@lru_cache(maxsize=64)
def _transform(corruption: str, severity: int, side: int) -> A.Compose:
    """One corruption at one severity for images of ``side`` pixels (the shorter side): its
    parameters are fixed, and what it still draws (noise, the rotation's sign) comes from a seed per image."""
    value = SEVERITY_PARAMETERS[corruption][severity - 1]
    step: A.BasicTransform | A.BaseCompose
    if corruption == "gaussian_noise":
        step = A.GaussNoise(std_range=(value, value), p=1.0)
    elif corruption == "gaussian_blur":
        sigma = value * side / BLUR_REFERENCE_SIDE
        # a 3-sigma kernel: albumentations' own size (int(3.5 sigma) * 2 + 1) drops to 1 pixel below sigma 0.29
        size = 2 * int(np.ceil(3 * sigma)) + 1
        step = A.GaussianBlur(blur_limit=(size, size), sigma_limit=(sigma, sigma), p=1.0)
    elif corruption == "contrast":
        # alpha * x + beta * mean(x), alpha = 1 + (c - 1), beta = 1 - c: (x - mean) * c + mean, ImageNet-C's contrast
        alpha, beta = (value - 1, value - 1), (1 - value, 1 - value)
        step = A.RandomBrightnessContrast(brightness_limit=beta, contrast_limit=alpha, brightness_by_max=False, p=1.0)
    elif corruption == "rotation":
        turns = [
            A.Rotate(limit=(angle, angle), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0) for angle in (value, -value)
        ]
        step = A.OneOf(turns, p=1.0)
    else:
        step = A.ImageCompression(compression_type="jpeg", quality_range=(int(value), int(value)), p=1.0)
    return A.Compose([step])


def _seed(corruption: str, severity: int, index: int) -> int:
    """A seed of its own for each (corruption, severity, image index), the same in every process
    (``hash`` of a string is not)."""
    return int(np.random.SeedSequence([zlib.crc32(corruption.encode()), severity, index]).generate_state(1)[0])


def corrupt(images: torch.Tensor, corruption: str, severity: int, first_index: int = 0) -> torch.Tensor:
    """A corrupted copy of a uint8 NCHW batch (same shape, dtype and device).

    Args:
        images: uint8 images, as the eval transform yields them.
        corruption: one of :data:`CORRUPTIONS`.
        severity: one of :data:`SEVERITIES`.
        first_index: the index of the batch's first image in its split: image ``i`` is corrupted
            with the seed of ``first_index + i``, so a split gives the same pixels however it is batched.

    Raises:
        ConfigError: an unknown corruption or severity, or images that are not a uint8 NCHW batch.
    """
    check_corruption(corruption, severity)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ConfigError(f"corrupt takes a uint8 NCHW batch, not {images.dtype} of shape {tuple(images.shape)}.")
    transform = _transform(corruption, severity, min(images.shape[-2:]))
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arrays)
    for i, image in enumerate(arrays):
        transform.set_random_seed(_seed(corruption, severity, first_index + i))
        # OpenCV drops a trailing channel axis of 1; the reshape puts it back
        out[i] = transform(image=np.ascontiguousarray(image))["image"].reshape(image.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


@dataclass(frozen=True)
class ShiftScores:
    """Top-1 accuracy on the clean test split and on its corrupted copies.

    Attributes:
        id_top1: on the clean (in-distribution) images.
        corrupted_top1: the mean over every corruption and severity scored.
        per_corruption: each corruption's mean over the severities.
        per_severity: each corruption at each severity, keyed ``"<corruption>/<severity>"``.
        n_images: test images scored (each copy has as many).
    """

    id_top1: float
    corrupted_top1: float
    per_corruption: dict[str, float]
    per_severity: dict[str, float]
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShiftModel(BatchModel, Protocol):
    """What :func:`shift_scores` needs of the model (:class:`~vision_transfer.tasks.ImageClassifier`)."""

    @property
    def task_kind(self) -> Any: ...
    def eval(self) -> Any: ...
    def to(self, device: torch.device) -> Any: ...


@torch.no_grad()
def shift_scores(
    model: ShiftModel,
    loader: Iterable[Any],
    device: torch.device | str = "cpu",
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> ShiftScores:
    """Top-1 of a single-label model on ``loader``'s images, clean and under each corruption and severity.

    The loader is read once and its uint8 images kept in memory (Fashion-MNIST's test split at 64 px:
    120 MB); each corrupted copy is made batch by batch from them. Predictions are
    ``model.prediction_logits`` of one plain view (no test-time augmentation), as ``test``'s top-1.

    Args:
        model: a trained single-label :class:`~vision_transfer.tasks.ImageClassifier`; it is left in eval
            mode on ``device``.
        loader: batches of uint8 images and labels, like a datamodule's ``test_dataloader()``.
        device: where the model runs.
        corruptions: which of :data:`CORRUPTIONS` to score.
        severities: which of :data:`SEVERITIES` to score.

    Raises:
        ConfigError: a multi-label model, an unknown corruption or severity, none of either, a loader of
            cached features instead of images, or an empty loader.
    """
    model.task_kind.require_top1("shift_scores")
    if not corruptions or not severities:
        raise ConfigError("shift_scores needs at least one corruption and one severity.")
    for corruption in corruptions:
        for severity in severities:
            check_corruption(corruption, severity)
    batches = []
    for loaded in loader:
        batch = as_model_batch(loaded)
        if isinstance(batch, FeatureBatch):
            raise ConfigError("shift_scores corrupts images: give a loader of images, not of cached features.")
        batches.append((batch.images.cpu(), torch.as_tensor(batch.labels).cpu()))
    if not batches:
        raise ConfigError("shift_scores: the loader yielded no images.")
    device = torch.device(device)
    model.eval().to(device)

    def top1(corruption: str | None = None, severity: int = 0) -> float:
        correct, start = 0, 0
        for images, labels in batches:
            if corruption is not None:
                images = corrupt(images, corruption, severity, first_index=start)
            logits = model.prediction_logits(model(model.preprocess(images.to(device))))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            start += len(labels)
        return correct / start

    per_severity = {f"{c}/{s}": top1(c, s) for c in corruptions for s in severities}
    per_corruption = {c: float(np.mean([per_severity[f"{c}/{s}"] for s in severities])) for c in corruptions}
    return ShiftScores(
        id_top1=top1(),
        corrupted_top1=float(np.mean(list(per_severity.values()))),
        per_corruption=per_corruption,
        per_severity=per_severity,
        n_images=sum(len(labels) for _, labels in batches),
    )
