"""Errors that name the file or setting at fault; the CLI prints them without a traceback."""

from __future__ import annotations


class VisionTransferError(Exception):
    """Base class: a problem with the user's input or environment, explained in its message."""


class UnknownBackboneError(VisionTransferError, ValueError):
    """A backbone name timm does not know."""


class WeightsError(VisionTransferError):
    """Weights that cannot be found, loaded or fitted to the backbone."""


class DataError(VisionTransferError):
    """A dataset, CSV or split that cannot be used as given."""


class ImageLoadError(DataError):
    """An image file that cannot be decoded."""


class UnsafeCheckpointError(WeightsError):
    """A pickle that needs more than tensors and plain containers to load."""
