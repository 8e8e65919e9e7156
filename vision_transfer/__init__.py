"""vision-transfer: transfer learning for computer vision on timm backbones and Lightning.

Every name below is imported on first use, so ``import vision_transfer.<package>`` loads that
package alone (and Lightning only where a task, datamodule or the command line needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CachedFeatureDataModule": "vision_transfer.datamodules",
    "Classifier": "vision_transfer.export.loading",
    "CsvDataModule": "vision_transfer.datamodules",
    "DataConfig": "vision_transfer.backbones",
    "ImageClassifier": "vision_transfer.tasks",
    "ImageFolderDataModule": "vision_transfer.datamodules",
    "VisionTransferError": "vision_transfer.errors",
    "create_backbone": "vision_transfer.backbones",
    "create_model": "vision_transfer.backbones",
    "list_backbones": "vision_transfer.backbones",
    "preprocessing": "vision_transfer.backbones",
    "load_backbone": "vision_transfer.export.loading",
    "load_classifier": "vision_transfer.export.loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vision_transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
