"""Image pipelines built from a backbone's :class:`DataConfig`.

Training augmentation is albumentations; eval preprocessing is timm's own eval transform, so
what we feed a model equals what plain timm feeds it. Both return uint8 CHW tensors:
normalisation happens on the device, after the batch transfer (4x less to copy than float32,
and free on a GPU).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data.transforms_factory import transforms_imagenet_eval

from vision_transfer.backbones import DataConfig
from vision_transfer.data.images import array_to_rgb
from vision_transfer.errors import DataError

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def _interpolation(config: DataConfig) -> int:
    return _INTERPOLATION.get(config.interpolation, cv2.INTER_CUBIC)


AugmentPreset = Literal["none", "light", "medium", "strong"]
AUGMENT_PRESETS: tuple[str, ...] = ("none", "light", "medium", "strong")


class TrainTransform:
    """albumentations geometry on the decoded array, then optional torchvision ops on the uint8 tensor.

    Called like an albumentations transform: ``transform(image=array)["image"]``. The albumentations
    part draws from its own generator (seeded by the dataset per worker); the torchvision part
    draws from torch's, which DataLoader workers seed per worker too.
    """

    def __init__(self, geometry: A.Compose, tensor_ops: Any = None) -> None:
        self.geometry = geometry
        self.tensor_ops = tensor_ops

    def set_random_seed(self, seed: int) -> None:
        self.geometry.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.geometry(image=image)["image"]
        return {"image": self.tensor_ops(out) if self.tensor_ops is not None else out}


STRONG_SCALE_MIN = 0.08  # Inception's random resized crop, as timm draws it


def smallest_crop(preset: AugmentPreset, scale_min: float) -> float:
    """The smallest area fraction a preset's random resized crop takes (``strong``: Inception's 8%)."""
    return STRONG_SCALE_MIN if preset == "strong" else scale_min


def create_train_transform(
    config: DataConfig,
    *,
    preset: AugmentPreset = "light",
    scale: tuple[float, float] = (0.35, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
) -> TrainTransform:
    """Training augmentation at the model's input size.

    Presets: ``light`` = random resized crop (``scale``) + horizontal flip (the default);
    ``medium`` = light + TrivialAugmentWide (Muller and Hutter 2021) + random erasing (p 0.25);
    ``strong`` = random resized crop from 8% of the area (Inception/timm) + flip + RandAugment
    (2 ops, magnitude 9: timm's rand-m9) + random erasing (p 0.25). ``none`` is the caller's
    business (the eval transform). ``color_jitter`` adds brightness/contrast/saturation jitter.
    """
    from torchvision.transforms import v2

    if preset not in AUGMENT_PRESETS or preset == "none":
        raise DataError(f"augment={preset!r}: a training preset is one of light, medium, strong.")
    _, height, width = config.input_size
    scale = (smallest_crop(preset, scale[0]), scale[1])
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
    tensor_ops = None
    if preset == "medium":
        tensor_ops = v2.Compose([v2.TrivialAugmentWide(), v2.RandomErasing(p=0.25, value=0)])
    elif preset == "strong":
        tensor_ops = v2.Compose([v2.RandAugment(num_ops=2, magnitude=9), v2.RandomErasing(p=0.25, value=0)])
    return TrainTransform(A.Compose(steps), tensor_ops)


# What timm's eval transform understands; anything else it would silently treat as "center" or fail on.
EVAL_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


class EvalTransform:
    """timm's eval transform (PIL resize, crop or pad) with a uint8 tensor out instead of normalised floats.

    Called like an albumentations transform: ``transform(image=array)["image"]``. The array may be
    anything :func:`~vision_transfer.data.images.array_to_rgb` reads (HxWx3 uint8 passes unchanged).
    """

    def __init__(self, config: DataConfig) -> None:
        if config.crop_mode not in CROP_MODES:
            raise DataError(f"crop_mode={config.crop_mode!r} is not one of timm's: {', '.join(CROP_MODES)}.")
        if config.interpolation not in EVAL_INTERPOLATIONS:
            raise DataError(
                f"interpolation={config.interpolation!r} is not one of timm's: {', '.join(EVAL_INTERPOLATIONS)}."
            )
        self.config = config
        # use_prefetcher: timm's pipeline minus ToTensor/Normalize, ending in a uint8 CHW tensor.
        self.pipeline = transforms_imagenet_eval(
            img_size=config.input_size[1:],
            crop_pct=config.crop_pct,
            crop_mode=config.crop_mode,
            interpolation=config.interpolation,
            mean=config.mean,
            std=config.std,
            use_prefetcher=True,
        )

    def __call__(self, *, image: np.ndarray, **_: Any) -> dict[str, torch.Tensor]:
        return {"image": self.pipeline(Image.fromarray(array_to_rgb(image)))}

    def __repr__(self) -> str:
        return f"EvalTransform({self.pipeline})"


def create_eval_transform(config: DataConfig) -> EvalTransform:
    """timm's eval preprocessing (``size / crop_pct`` resize, then crop by ``crop_mode``) to a uint8 tensor.

    Raises:
        DataError: ``crop_mode`` or ``interpolation`` is not one timm's eval transform knows.
    """
    return EvalTransform(config)


EVAL_DECODE_MARGIN = 2  # eval decodes at >= twice timm's resize: the antialiased resize, not libjpeg, does most


def decode_side(config: DataConfig, scale_min: float | None = None) -> int | None:
    """The shorter side a JPEG decoded at reduced size (libjpeg's 1/2, 1/4, 1/8) keeps for a transform.

    Eval (``scale_min`` None): twice timm's resize to ``size / crop_pct`` (every crop mode resizes
    within it), so the eval tensor stays within a tested tolerance of timm's full decode (at 1x the
    DCT scaling's box filter shows: up to 2.8 levels on fur). Training: the smallest random-resized
    crop, ``scale_min`` of the area at aspect 4/3, still covers the input size (never upsampled).
    None (decode in full): eval in timm's ``border`` mode, whose padded size follows the aspect ratio,
    which libjpeg's rounding of scaled sizes moves by a pixel (measured: 5 levels off).
    """
    size = max(config.input_size[1:])
    if scale_min is None:
        if config.crop_mode == "border":
            return None
        return EVAL_DECODE_MARGIN * math.ceil(size / min(config.crop_pct, 1.0))
    return math.ceil(size / math.sqrt(0.75 * scale_min))


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
