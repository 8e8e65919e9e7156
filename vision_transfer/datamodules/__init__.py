"""LightningDataModules over the image sources in :mod:`vision_transfer.data`."""

from vision_transfer.datamodules.image import (
    CsvDataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)

__all__ = ["CsvDataModule", "DigitsDataModule", "FashionMNISTDataModule", "ImageDataModule", "ImageFolderDataModule"]
