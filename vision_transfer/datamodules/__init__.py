"""LightningDataModules over the image sources in :mod:`vision_transfer.data`."""

from vision_transfer.datamodules.image import (
    CsvDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)

__all__ = ["CsvDataModule", "FashionMNISTDataModule", "ImageDataModule", "ImageFolderDataModule"]
