"""vision-transfer: transfer learning for computer vision on timm backbones and Lightning."""

from vision_transfer.backbones import DataConfig, create_backbone, create_model, list_backbones
from vision_transfer.errors import VisionTransferError

__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "ImageClassifier",
    "VisionTransferError",
    "create_backbone",
    "create_model",
    "list_backbones",
]


def __getattr__(name: str) -> object:
    # Lightning is imported only when a task is used, so backbones and data stay light.
    if name == "ImageClassifier":
        from vision_transfer.tasks import ImageClassifier

        return ImageClassifier
    raise AttributeError(name)
