"""albumentations pipelines built from a backbone's :class:`DataConfig`.

Both return uint8 CHW tensors: normalisation happens on the device, after the batch transfer
(4x less to copy than float32, and free on a GPU).
"""

from __future__ import annotations

import math

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

from vision_transfer.backbones import DataConfig

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _interpolation(config: DataConfig) -> int:
    return _INTERPOLATION.get(config.interpolation, cv2.INTER_CUBIC)


def create_train_transform(
    config: DataConfig,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
) -> A.Compose:
    """Random resized crop at the model's input size, horizontal flip, optional colour jitter."""
    _, height, width = config.input_size
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(
            size=(height, width), scale=scale, interpolation=_interpolation(config), area_for_downscale="image"
        )
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def create_eval_transform(config: DataConfig) -> A.Compose:
    """timm's eval preprocessing: resize to ``size / crop_pct`` then center crop to ``size``."""
    _, height, width = config.input_size
    interpolation = _interpolation(config)
    scale_h, scale_w = math.floor(height / config.crop_pct), math.floor(width / config.crop_pct)
    resize: A.BasicTransform
    if config.crop_mode == "squash" or height != width:
        resize = A.Resize(scale_h, scale_w, interpolation=interpolation, area_for_downscale="image")
    else:
        resize = A.SmallestMaxSize(max_size=scale_h, interpolation=interpolation, area_for_downscale="image")
    return A.Compose([resize, A.CenterCrop(height, width), ToTensorV2()])


class Normalize(torch.nn.Module):
    """The device-side half of the pipeline: uint8 NCHW batch -> normalised float batch.

    Float batches pass through (already normalised). ``mean``/``std`` are non-persistent
    buffers, so they follow the module to the device and never enter a checkpoint.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, data_config: DataConfig, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        self.memory_format = memory_format
        self.register_buffer("mean", torch.tensor(data_config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data_config.std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.mean.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = (images.float() - self.mean) / self.std
        return images.contiguous(memory_format=self.memory_format) if images.ndim == 4 else images

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse, for showing normalised images: NCHW float -> NCHW uint8."""
        return (images.float() * self.std + self.mean).round().clamp(0, 255).to(torch.uint8)
