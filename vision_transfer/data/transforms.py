"""albumentations pipelines built from a backbone's :class:`DataConfig`.

Both return uint8 CHW tensors: normalisation happens on the device, after the batch transfer
(4x less to copy than float32, and free on a GPU).
"""

from __future__ import annotations

import math

import albumentations as A
import cv2
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
