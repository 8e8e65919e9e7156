"""The project's checkpoint format: one reader, one writer, one error type (no Lightning here).

A vision-transfer checkpoint is a Lightning checkpoint (``state_dict``, loop and optimizer state)
whose sections of ours hold each setting once:

- ``hyper_parameters``: ``ImageClassifier``'s constructor arguments, from which Lightning's
  ``load_from_checkpoint`` and the command line rebuild the model. Among them, written resolved:
  ``backbone``, ``class_names``, ``task`` (the task kind), ``data_config`` (the preprocessing the
  weights were trained with) and ``weights="none"`` (the state dict holds the weights). The data
  config lives here, not in the entry, because a model rebuilt from these arguments then starts
  with it (no later step swaps it, after a datamodule may have taken the default one); this is its
  only copy, and the entry's readers get it through :class:`CheckpointEntry`.
- ``vision_transfer``, the entry: what is not an argument: ``format``, ``initial_weights`` (where
  training started), ``prediction`` (``ImageClassifier.prediction_settings()``, for readers
  without the model: its temperature and thresholds are the state dict's buffers, which win),
  ``datamodule`` (class path and arguments, so ``--ckpt_path`` needs no data options) and, after
  ``calibrate``, its ``calibration`` report.

:func:`read_checkpoint` loads a file once and returns both as one validated
:class:`CheckpointEntry`; every problem is a :class:`~vision_transfer.errors.CheckpointError`
naming the file. A Trainer given ``ckpt_path`` reads the file itself (it restores optimizer and
loop state too); ``ImageClassifier.on_load_checkpoint`` validates what it read with
:func:`parse_checkpoint`. There is one format (``FORMAT``) and no reader of earlier, unreleased ones.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision_transfer.backbones import DataConfig
from vision_transfer.backbones.weights import safe_torch_load
from vision_transfer.errors import CheckpointError, WeightsError
from vision_transfer.files import write_atomic

ENTRY = "vision_transfer"
SETTINGS = "hyper_parameters"  # Lightning's name for the model's constructor arguments
FORMAT = 1


@dataclass(frozen=True)
class CheckpointEntry:
    """What a vision-transfer checkpoint says about its model, validated.

    Attributes:
        source: the file (or what Lightning read), for messages.
        settings: ``ImageClassifier``'s arguments as saved (backbone, classes, task and
            data config included), Lightning's internal keys (``_instantiator``...) left out.
        datamodule: ``{"class_path", "init_args"}`` of the training data, when recorded.
        calibration: the report of the last calibration, without its reliability curves.
    """

    source: str
    backbone: str
    class_names: list[str]
    task: str
    data_config: DataConfig
    initial_weights: dict[str, Any]
    prediction: dict[str, Any]
    settings: dict[str, Any]
    datamodule: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None


def read_checkpoint(path: str | Path) -> tuple[CheckpointEntry, dict[str, Any]]:
    """Load a checkpoint once (tensors and plain containers only) and validate it.

    Returns:
        The entry and the whole loaded content (for its ``state_dict`` and loop state).
    """
    try:
        content = safe_torch_load(path)
    except CheckpointError:
        raise
    except WeightsError as e:  # not found, not a torch file, unreadable: the same messages, one type
        raise CheckpointError(str(e)) from e
    return parse_checkpoint(content, str(path)), content


def parse_checkpoint(content: Any, source: str) -> CheckpointEntry:
    """Validate loaded checkpoint content and return its entry; ``source`` names it in errors."""

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what}")

    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise fail("not a Lightning checkpoint (no state_dict in it).")
    entry = content.get(ENTRY)
    if not isinstance(entry, dict):
        raise fail(f"a Lightning checkpoint, but not one vision-transfer wrote (no {ENTRY!r} entry).")
    settings = content.get(SETTINGS)
    if not isinstance(settings, dict):
        raise fail(f"no {SETTINGS!r} (the model's arguments) in it.")
    if entry.get("format") != FORMAT:
        raise fail(f"checkpoint format {entry.get('format')!r}; this vision-transfer reads format {FORMAT} only.")
    for name, kind, section in (
        ("backbone", str, settings),
        ("class_names", list, settings),
        ("task", str, settings),
        ("data_config", dict, settings),
        ("initial_weights", dict, entry),
        ("prediction", dict, entry),
    ):
        if not isinstance(section.get(name), kind):
            where = SETTINGS if section is settings else f"the {ENTRY!r} entry"
            found = "missing" if name not in section else f"a {type(section[name]).__name__}"
            raise fail(f"{name} in {where} is {found}, expected a {kind.__name__}.")
    names = settings["class_names"]
    if len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise fail(f"class_names must be two or more names, found {names!r}.")
    task = settings["task"]
    if entry["prediction"].get("task", task) != task:
        raise fail(f"its prediction settings are for task {entry['prediction']['task']!r}, the model is {task}.")
    try:
        data_config = DataConfig.from_dict(settings["data_config"])
    except (TypeError, KeyError, ValueError) as e:
        raise fail(f"data_config {settings['data_config']!r} is not a preprocessing config ({e}).") from e
    state = content["state_dict"]
    head = state.get("head.weight")
    if not isinstance(head, torch.Tensor) or head.ndim != 2:
        raise fail("no linear head (head.weight) in its state_dict.")
    per_class: dict[str, int | None] = {"head.weight": head.shape[0], "head.bias": _rows(state.get("head.bias"))}
    per_class |= {k: _rows(state[k]) for k in ("class_counts", "thresholds") if k in state}  # buffers, one per class
    for key, rows in per_class.items():
        if rows != len(names):
            has = "none" if rows is None else rows
            raise fail(f"names {len(names)} classes, but its {key} has {has} (the file was altered or mixed up).")
    datamodule = entry.get("datamodule")
    if datamodule is not None and not (
        isinstance(datamodule, dict)
        and isinstance(datamodule.get("class_path"), str)
        and isinstance(datamodule.get("init_args", {}), dict)
    ):
        raise fail("its datamodule record is not {'class_path': str, 'init_args': dict}.")
    return CheckpointEntry(
        source=source,
        backbone=settings["backbone"],
        class_names=list(names),
        task=task,
        data_config=data_config,
        initial_weights=dict(entry["initial_weights"]),
        prediction=_prediction(entry["prediction"], state, task),
        settings={k: v for k, v in settings.items() if not k.startswith("_")},
        datamodule=datamodule,
        calibration=entry.get("calibration"),
    )


def _rows(value: Any) -> int | None:
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.ndim == 1 else None


def _prediction(recorded: dict[str, Any], state: dict[str, Any], task: str) -> dict[str, Any]:
    """The prediction settings, each temperature or thresholds they use taken from the weights' own buffer."""
    prediction = {**recorded, "task": task}
    for name in ("temperature", "thresholds"):
        if prediction.get(name) is not None and isinstance(state.get(name), torch.Tensor):
            prediction[name] = state[name].tolist()
    return prediction


def write_entry(
    checkpoint: dict[str, Any],
    *,
    settings: Mapping[str, Any],
    class_names: list[str],
    task: str,
    data_config: DataConfig,
    initial_weights: Mapping[str, Any],
    prediction: Mapping[str, Any],
    datamodule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write our two sections into ``checkpoint`` (what Lightning saves, or a new dict), in place.

    Args:
        settings: the model's constructor arguments (its ``hparams``); the classes, task and data
            config given here replace theirs, and ``weights`` becomes ``none``.
        datamodule: the training data's ``{"class_path", "init_args"}``, when known.

    Returns:
        ``checkpoint``.
    """
    checkpoint[SETTINGS] = {
        **settings,
        "weights": "none",
        "class_names": list(class_names),
        "task": task,
        "data_config": data_config.to_dict(),
    }
    entry: dict[str, Any] = {"format": FORMAT, "initial_weights": dict(initial_weights), "prediction": dict(prediction)}
    if datamodule:
        entry["datamodule"] = dict(datamodule)
    checkpoint[ENTRY] = entry
    return checkpoint


def set_prediction(
    checkpoint: dict[str, Any], prediction: Mapping[str, Any], calibration: Mapping[str, Any] | None = None
) -> None:
    """Replace the prediction settings (and the calibration report) of read checkpoint content."""
    checkpoint[ENTRY]["prediction"] = dict(prediction)
    if calibration is not None:
        checkpoint[ENTRY]["calibration"] = dict(calibration)


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write checkpoint content to ``path`` atomically (the previous file stays whole until then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, buffer.getbuffer(), "checkpoint")
    return path
