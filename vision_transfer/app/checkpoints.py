"""Reading our checkpoints for the application: what a file is, and the settings it records.

The checkpoint's ``vision_transfer`` entry is written by ``ImageClassifier``; every command that
starts from a checkpoint (``--ckpt_path``, ``calibrate``) reads its settings here.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vision_transfer.backbones.weights import safe_torch_load
from vision_transfer.datamodules import ImageDataModule
from vision_transfer.errors import CheckpointError
from vision_transfer.tasks import ImageClassifier

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A vision-transfer checkpoint's content, or an error that says what the file is instead."""
    content = safe_torch_load(path)
    if not isinstance(content, dict) or "state_dict" not in content:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict in it).")
    if "vision_transfer" not in content:
        raise CheckpointError(
            f"{path}: a Lightning checkpoint, but not one vision-transfer wrote (no 'vision_transfer' entry)."
        )
    return content


def checkpoint_defaults(checkpoint: str | Path | Mapping[str, Any], with_data: bool = True) -> dict[str, Any]:
    """Model and (with ``with_data``) datamodule settings stored in one of our checkpoints (a path or
    its content), as a config.

    Only settings ``ImageClassifier`` still takes are kept (older checkpoints may hold others), and
    only datamodule classes of vision-transfer are accepted: a checkpoint must not choose which
    module gets imported.
    """
    content = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    accepted = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self"}
    hparams = content.get("hyper_parameters", {})
    dropped = sorted(k for k in hparams if k not in accepted and not k.startswith("_"))
    if dropped:
        log.warning("checkpoint settings no longer used, ignored: %s", ", ".join(dropped))
    model = {k: v for k, v in hparams.items() if k in accepted}
    meta = content.get("vision_transfer", {})
    if "data_config" not in model and meta.get("data_config"):  # checkpoints written before data_config was an argument
        model["data_config"] = meta["data_config"]
    defaults: dict[str, Any] = {"model": model}
    datamodule = meta.get("datamodule")
    if datamodule and with_data:
        class_path = datamodule["class_path"]
        _check_datamodule_class(class_path)
        init_args = {k: v for k, v in datamodule.get("init_args", {}).items() if not k.startswith("_")}
        defaults["data"] = {"class_path": class_path, "init_args": init_args}
    return defaults


def _check_datamodule_class(class_path: str) -> None:
    module_name, _, name = class_path.rpartition(".")
    if not module_name.startswith("vision_transfer.") or not re.fullmatch(r"[\w.]+", class_path):
        raise CheckpointError(
            f"the checkpoint names datamodule class {class_path!r}, outside vision-transfer; refusing to import it. "
            "Give the data explicitly with --data."
        )
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(
            f"the checkpoint's datamodule class {class_path!r} does not exist here; use --data."
        ) from e
    if not (inspect.isclass(cls) and issubclass(cls, ImageDataModule)):
        raise CheckpointError(f"the checkpoint's datamodule class {class_path!r} is not a datamodule; use --data.")
