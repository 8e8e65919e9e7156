"""timm backbones from packaged, local or hub weights, with their preprocessing config."""

from vision_transfer.backbones.create import (
    BackboneInfo,
    DataConfig,
    create_backbone,
    create_model,
    list_backbones,
)
from vision_transfer.backbones.weights import WeightsSource, load_file, resolve_weights

__all__ = [
    "BackboneInfo",
    "DataConfig",
    "WeightsSource",
    "create_backbone",
    "create_model",
    "list_backbones",
    "load_file",
    "resolve_weights",
]
