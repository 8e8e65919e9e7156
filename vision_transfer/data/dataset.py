"""A torch Dataset over :class:`Samples`, and the expansion of prediction inputs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from vision_transfer.data.images import IMAGE_SUFFIXES, Decode
from vision_transfer.data.sources import Samples
from vision_transfer.errors import DataError, ImageLoadError


class UnreadableImage(NamedTuple):
    """What a skipping :class:`ImageDataset` yields for a file it cannot decode."""

    path: str
    reason: str


class SkippingBatch(NamedTuple):
    """A batch that left out unreadable images (made by :func:`collate_readable`)."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[UnreadableImage]


class BatchModel(Protocol):
    """What a batch needs of the model it feeds (:class:`~vision_transfer.tasks.ImageClassifier`)."""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor: ...
    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
    def forward_head(self, features: torch.Tensor) -> torch.Tensor: ...
    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor: ...
    def tta_logits(self, images: torch.Tensor) -> torch.Tensor: ...


class ImageBatch(NamedTuple):
    """A batch of images (uint8 from the loader, normalised once :meth:`prepared`) and their labels.

    It and :class:`FeatureBatch` answer the same questions, so the model never asks which it has.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def prepared(self, model: BatchModel) -> ImageBatch:
        return ImageBatch(model.preprocess(self.images), self.labels)

    def mixed(self, mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> tuple[
        ImageBatch, torch.Tensor
    ]:  # fmt: skip
        """The batch with mixed images (mixup/CutMix) and its soft targets."""
        images, target = mix(self.images, self.labels)
        return ImageBatch(images, self.labels), target

    def logits(self, model: BatchModel) -> torch.Tensor:
        """Raw logits of one plain view."""
        return model(self.images)

    def final_logits(self, model: BatchModel) -> torch.Tensor:
        """The logits predictions come from: adjusted, calibrated and averaged over the TTA views."""
        return model.tta_logits(self.images)

    def tta_logits(self, model: BatchModel) -> torch.Tensor | None:
        """:meth:`final_logits`, where test-time augmentation can apply (images)."""
        return model.tta_logits(self.images)

    def view_logits(self, model: BatchModel, views: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[
        torch.Tensor
    ]:  # fmt: skip
        """Raw logits of each test-time view (calibration fits on them as predictions average them)."""
        return [model(view) for view in views(self.images)]

    def to(self, device: torch.device) -> ImageBatch:
        return ImageBatch(self.images.to(device), self.labels)


class FeatureBatch(NamedTuple):
    """A batch of cached backbone features (not images) and their labels: only the head runs."""

    features: torch.Tensor
    labels: torch.Tensor

    def prepared(self, model: BatchModel) -> FeatureBatch:
        return self

    def mixed(self, mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> tuple[
        FeatureBatch, torch.Tensor
    ]:  # fmt: skip
        return self, self.labels  # features do not mix (the model refuses mixup with cache_features)

    def logits(self, model: BatchModel) -> torch.Tensor:
        return model.forward_head(self.features.float())

    def final_logits(self, model: BatchModel) -> torch.Tensor:
        return model.prediction_logits(self.logits(model))

    def tta_logits(self, model: BatchModel) -> torch.Tensor | None:
        return None  # no views of a feature vector

    def view_logits(self, model: BatchModel, views: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[
        torch.Tensor
    ]:  # fmt: skip
        return [self.logits(model)]

    def to(self, device: torch.device) -> FeatureBatch:
        return FeatureBatch(self.features.to(device), self.labels)


ModelBatch = ImageBatch | FeatureBatch


def as_model_batch(batch: Any) -> ModelBatch:
    """A loader's batch as :class:`ImageBatch` or :class:`FeatureBatch` (a plain ``(images, labels)``
    sequence, e.g. from a user's own DataLoader, is taken as images)."""
    if isinstance(batch, (ImageBatch, FeatureBatch)):
        return batch
    return ImageBatch(batch[0], batch[1])


class ImageDataset(Dataset):
    """Samples decoded to RGB and transformed to uint8 CHW tensors; yields ``(image, label)``.

    Args:
        samples: the images and labels.
        transform: an albumentations transform.
        skip_unreadable: yield an :class:`UnreadableImage` for a file that does not decode
            (batch with :func:`collate_readable`) instead of raising :class:`ImageLoadError`.
        min_side: the shorter side ``transform`` needs, so that a JPEG may decode at reduced size
            (:func:`~vision_transfer.data.transforms.decode_side`); None decodes in full.
        decode: how JPEGs decode (:func:`~vision_transfer.data.images.load_image`).
    """

    def __init__(
        self, samples: Samples, transform: Any, skip_unreadable: bool = False, min_side: int | None = None,
        decode: Decode = "full",
    ) -> None:  # fmt: skip
        self.samples = samples
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.min_side = min_side
        self.decode = decode
        self._seeded_in: int | None = None

    def _seed_transform(self) -> None:
        """albumentations draws from its own generator, which global seeds do not reach: seed it
        from torch's per-process seed (set by ``seed_everything``, distinct in each DataLoader
        worker), so augmentations are reproducible and workers do not repeat each other."""
        if self._seeded_in != os.getpid() and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(torch.initial_seed() % 2**32)
            self._seeded_in = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor] | UnreadableImage:
        return self.read(index, lambda: self.samples.image(index, min_side=self.min_side, decode=self.decode))

    def read(
        self, index: int, load: Callable[[], np.ndarray]
    ) -> tuple[torch.Tensor, int | torch.Tensor] | UnreadableImage:
        """Sample ``index``, its image from ``load`` (a decode of bytes already read, when streamed)."""
        self._seed_transform()
        try:
            image = load()
        except ImageLoadError as e:
            if not self.skip_unreadable:
                raise
            return UnreadableImage(self.samples.name(index), e.reason)
        label = self.samples.labels[index]
        target = torch.from_numpy(label.astype(np.float32)) if label.ndim else int(label)  # multi-label: a 0/1 row
        return self.transform(image=image)["image"], target


def collate_images(samples: list[Any]) -> ImageBatch:
    """``default_collate`` of ``(image, label)`` samples, as an :class:`ImageBatch`."""
    images, labels = default_collate(samples)
    return ImageBatch(images, labels)


def collate_readable(samples: list[Any]) -> Any:
    """``default_collate`` of the samples that decoded; a :class:`SkippingBatch` names the others."""
    skipped = [s for s in samples if isinstance(s, UnreadableImage)]
    if not skipped:
        return collate_images(samples)
    if len(skipped) == len(samples):
        first = skipped[0]
        raise ImageLoadError(first.path, f"{first.reason} (and every other image of its batch is unreadable)")
    images, labels = default_collate([s for s in samples if not isinstance(s, UnreadableImage)])
    return SkippingBatch(images, labels, skipped)


def list_predict_files(paths: str | list[str]) -> list[str]:
    """Expand folders (recursively), image files and ``.txt`` file lists into image paths."""
    out: list[str] = []
    for entry in [paths] if isinstance(paths, str) else paths:
        path = Path(entry)
        if path.is_dir():
            out.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".txt" and path.is_file():
            base = path.parent
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            out.extend(str(base / line) for line in lines)
        elif path.is_file():
            out.append(str(path))
        else:
            raise DataError(f"predict_paths: {path} is not a file, a folder or a .txt list.")
    if not out:
        raise DataError(f"predict_paths: no images found in {paths}.")
    return out
