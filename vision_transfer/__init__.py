"""vision-transfer: transfer learning for computer vision on timm backbones and Lightning."""

from vision_transfer.backbones import DataConfig, create_backbone, create_model, list_backbones
from vision_transfer.errors import VisionTransferError
from vision_transfer.export.loading import Classifier, load_backbone, load_classifier

__version__ = "0.1.0"

__all__ = [
    "Classifier",
    "DataConfig",
    "ImageClassifier",
    "VisionTransferError",
    "connect",
    "create_backbone",
    "create_model",
    "list_backbones",
    "load_backbone",
    "load_classifier",
]


def __getattr__(name: str) -> object:
    # Lightning is imported only when a task is used, so backbones, data and loading stay light.
    if name == "ImageClassifier":
        from vision_transfer.tasks import ImageClassifier

        return ImageClassifier
    if name == "connect":
        from vision_transfer.app.connect import connect

        return connect
    raise AttributeError(name)
