"""timm backbones from packaged, local or hub weights, with their preprocessing config."""

from vision_transfer.backbones.create import (
    BackboneInfo,
    DataConfig,
    create_backbone,
    create_model,
    list_backbones,
    preprocessing,
    resolve_data_config,
)
from vision_transfer.backbones.weights import WeightsSource, load_file, resolve_weights, state_fingerprint

__all__ = [
    "BackboneInfo",
    "DataConfig",
    "WeightsSource",
    "create_backbone",
    "create_model",
    "list_backbones",
    "load_file",
    "preprocessing",
    "resolve_data_config",
    "resolve_weights",
    "state_fingerprint",
]
