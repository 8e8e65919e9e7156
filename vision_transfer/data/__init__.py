"""Image sources, splits, decoding and albumentations transforms; no Lightning here."""

from vision_transfer.data.dataset import FeatureBatch, ImageBatch, ImageDataset, list_predict_files
from vision_transfer.data.images import check_image_header, load_image
from vision_transfer.data.sources import (
    Samples,
    SourceSplits,
    read_csv,
    read_fashion_mnist,
    read_image_folder,
    stratified_split,
    stratified_subset,
)
from vision_transfer.data.transforms import create_eval_transform, create_train_transform

__all__ = [
    "FeatureBatch",
    "ImageBatch",
    "ImageDataset",
    "Samples",
    "SourceSplits",
    "check_image_header",
    "create_eval_transform",
    "create_train_transform",
    "list_predict_files",
    "load_image",
    "read_csv",
    "read_fashion_mnist",
    "read_image_folder",
    "stratified_split",
    "stratified_subset",
]
