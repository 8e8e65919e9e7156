"""What the application builds from a checkpoint read by :mod:`vision_transfer.checkpoint`: the
command line's defaults, the recorded datamodule, the model."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from vision_transfer.checkpoint import CheckpointEntry
from vision_transfer.datamodules import ImageDataModule
from vision_transfer.errors import CheckpointError
from vision_transfer.tasks import ImageClassifier


def model_settings(entry: CheckpointEntry) -> dict[str, Any]:
    """The checkpoint's ``ImageClassifier`` arguments; one it no longer takes is refused, not dropped."""
    accepted = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self"}
    unknown = sorted(set(entry.settings) - accepted)
    if unknown:
        raise CheckpointError(
            f"{entry.source}: written with settings this version of ImageClassifier does not take "
            f"({', '.join(unknown)}); train it again with this version."
        )
    return dict(entry.settings)


def checkpoint_defaults(entry: CheckpointEntry, with_data: bool = True) -> dict[str, Any]:
    """Model and (with ``with_data``) datamodule settings of a checkpoint, as a LightningCLI config.

    The classes, task and class counts are left out of the model's: the command line links them from
    the datamodule, which gets the checkpoint's classes and task. Only datamodule classes of
    vision-transfer are accepted: a checkpoint must not choose which module gets imported.
    """
    linked = ("class_names", "task", "class_counts")
    defaults: dict[str, Any] = {"model": {k: v for k, v in model_settings(entry).items() if k not in linked}}
    if entry.datamodule and with_data:
        class_path = entry.datamodule["class_path"]
        _datamodule_class(class_path, entry.source)
        init_args = {k: v for k, v in entry.datamodule.get("init_args", {}).items() if not k.startswith("_")}
        defaults["data"] = {"class_path": class_path, "init_args": init_args}
    return defaults


def recorded_datamodule(entry: CheckpointEntry) -> ImageDataModule:
    """The datamodule the checkpoint was trained on, built from its record with the checkpoint's
    preprocessing, classes and task."""
    if not entry.datamodule:
        raise CheckpointError(f"{entry.source}: records no datamodule; give the data (--data ...).")
    cls = _datamodule_class(entry.datamodule["class_path"], entry.source)
    init_args = {k: v for k, v in entry.datamodule.get("init_args", {}).items() if not k.startswith("_")}
    trained = {"data_config": entry.data_config.to_dict(), "classes": entry.class_names, "task": entry.task}
    return cls(**{**init_args, **trained})


def model_from_checkpoint(entry: CheckpointEntry, content: dict[str, Any]) -> ImageClassifier:
    """The trained model of checkpoint content already read (what ``load_from_checkpoint`` does, without
    reading the file again)."""
    model = ImageClassifier(**model_settings(entry))
    model.adopt_checkpoint(entry)
    model.load_state_dict(content["state_dict"])
    return model


def _datamodule_class(class_path: str, source: str) -> type[ImageDataModule]:
    module_name, _, name = class_path.rpartition(".")
    if not module_name.startswith("vision_transfer.") or not re.fullmatch(r"[\w.]+", class_path):
        raise CheckpointError(
            f"{source}: names datamodule class {class_path!r}, outside vision-transfer; refusing to import it. "
            "Give the data explicitly with --data."
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{source}: its datamodule class {class_path!r} does not exist here; use --data.") from e
    if not (inspect.isclass(cls) and issubclass(cls, ImageDataModule)):
        raise CheckpointError(f"{source}: its datamodule class {class_path!r} is not a datamodule; use --data.")
    return cls
