"""connect: the one place where a model and a datamodule learn about each other, before a Trainer runs."""

from __future__ import annotations

from typing import TypeVar

import torch

from vision_transfer.datamodules import CachedFeatureDataModule, ImageDataModule
from vision_transfer.errors import DataError
from vision_transfer.tasks import ImageClassifier

DataModule = TypeVar("DataModule", ImageDataModule, CachedFeatureDataModule)


def connect(
    model: ImageClassifier, datamodule: ImageDataModule | CachedFeatureDataModule
) -> ImageDataModule | CachedFeatureDataModule:
    """Hand the model's preprocessing to the datamodule and agree on the classes, once.

    A trained model (classes known, e.g. from a checkpoint) fixes the label indices and the task:
    the datamodule maps its labels onto them and refuses labels the model does not know. A new
    model takes the datamodule's task, classes and training class counts (the prior that class
    weighting and logit adjustment use) and builds its head. A model built with
    ``cache_features=True`` gets its datamodule wrapped in a
    :class:`~vision_transfer.datamodules.CachedFeatureDataModule` that extracts with the model's
    own backbone.

    Returns:
        The datamodule to give the Trainer (``datamodule``, or the cached-feature wrapper around it).
    """
    if model.hparams.get("cache_features") and not isinstance(datamodule, CachedFeatureDataModule):
        datamodule = CachedFeatureDataModule(datamodule, cache_dir=model.hparams.get("cache_dir"))
    datamodule.data_config = model.hand_out_data_config()
    model.record_datamodule(datamodule)
    if model.class_names is not None:  # classes given or trained: the data follows them
        datamodule.fixed_classes = list(model.class_names)
        datamodule.fixed_task = model.task
        if model.needs_class_counts and not model.has_class_counts:
            # classes given by name: the prior still comes from this data. A checkpoint restored later
            # replaces them with the counts it was trained with; data that cannot be read here (predict
            # on another machine) leaves that to the checkpoint, and fit reads it again at setup.
            try:
                datamodule.prepare_splits()
            except DataError:
                pass
            else:
                model.set_class_counts(torch.as_tensor(datamodule.class_counts()))
    else:
        datamodule.prepare_splits()
        model.set_task(datamodule.task)
        model.set_class_names(list(datamodule.class_names or []))
        model.set_class_counts(torch.as_tensor(datamodule.class_counts()))
    if isinstance(datamodule, CachedFeatureDataModule):
        datamodule.use_features_of(model)
    return datamodule
