"""LightningDataModules over the image sources in :mod:`vision_transfer.data`, and over cached features."""

from vision_transfer.datamodules.features import CachedFeatureDataModule
from vision_transfer.datamodules.image import (
    CsvDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)
from vision_transfer.datamodules.sources import HFDataModule, PreparedDataModule

__all__ = [
    "CachedFeatureDataModule",
    "CsvDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "HFDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "PreparedDataModule",
]
