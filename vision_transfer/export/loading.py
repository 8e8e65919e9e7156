"""Load what vision-transfer trained or exported, for use in other projects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from vision_transfer.backbones import DataConfig
from vision_transfer.checkpoint import read_checkpoint
from vision_transfer.data.images import array_to_rgb, load_image, to_rgb
from vision_transfer.data.transforms import Normalize, create_eval_transform
from vision_transfer.errors import WeightsError
from vision_transfer.evaluation.kinds import SINGLE, TaskKind, task_kind
from vision_transfer.export.adapter import is_adapter_folder, load_adapter
from vision_transfer.export.timm_format import (
    CONFIG_NAME,
    classifier_name,
    data_config_from_export,
    export_section,
    read_export,
)
from vision_transfer.inference.outputs import PredictionHead
from vision_transfer.tuning.adapters import merged_from_state

ImageInput = str | Path | Image.Image | np.ndarray


class Classifier(nn.Module):
    """A backbone, a linear head, their preprocessing and prediction settings, ready for inference.

    ``forward`` takes normalised float batches and returns raw logits (as timm models do);
    :meth:`predict` takes images in any form and applies everything else: the temperature,
    post-hoc logit adjustment, test-time augmentation and (multi-label) per-class thresholds.

    Args:
        prediction: ``task`` (``multiclass``/``multilabel``), ``temperature``, ``thresholds``,
            ``logit_shift`` and ``tta``, as a checkpoint or export records them.
    """

    def __init__(
        self,
        architecture: str,
        backbone: nn.Module,
        head: nn.Module,
        data_config: DataConfig,
        class_names: list[str],
        prediction: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.backbone = backbone
        self.head = head
        self.data_config = data_config
        self.class_names = class_names
        self.prediction = dict(prediction or {})
        self.provenance: dict[str, Any] = {}
        self.transform = create_eval_transform(data_config)
        self.normalize = Normalize(data_config)
        self.eval()

    @property
    def kind(self) -> TaskKind:
        """The task kind the model was trained for (single- or multi-label)."""
        return task_kind(self.prediction.get("task", SINGLE))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def prediction_head(self, tta: str | None = None) -> PredictionHead:
        """Images -> final logits (softmax/sigmoid of them are the final probabilities)."""
        shift = self.prediction.get("logit_shift")
        temperature = self.prediction.get("temperature") or 1.0
        return PredictionHead(
            PlainClassifier(self), self.kind, temperature,
            torch.tensor(shift) if shift else None, tta if tta is not None else self.prediction.get("tta", "none"),
        )  # fmt: skip

    def preprocess(self, images: Sequence[ImageInput] | ImageInput) -> torch.Tensor:
        """Files, PIL images or arrays (any dtype :func:`array_to_rgb` reads) -> a normalised NCHW float batch."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        arrays: list[torch.Tensor] = []
        for item in items:
            if isinstance(item, (str, Path)):
                array = load_image(item)
            elif isinstance(item, Image.Image):
                array = to_rgb(item)
            else:
                array = array_to_rgb(np.asarray(item), name=f"image {len(arrays)}")
            arrays.append(self.transform(image=array)["image"])
        return self.normalize(torch.stack(arrays))

    @torch.inference_mode()
    def predict(
        self, images: Sequence[ImageInput] | ImageInput, top_k: int = 5, tta: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Per image: the top-k ``(class name, probability)`` pairs; multi-label: every class at
        or above its threshold, most probable first. ``tta`` overrides the recorded setting."""
        probs = self.prediction_head(tta).probabilities(self.preprocess(images))
        thresholds = torch.tensor(self.prediction.get("thresholds") or [0.5] * probs.shape[1])
        return self.kind.ranked(probs, self.class_names, thresholds, top_k)


class PlainClassifier(nn.Module):
    """Just backbone + head (no Python-side preprocessing): what TorchScript and ONNX trace."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.backbone = classifier.backbone
        self.head = classifier.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


@dataclass
class Loaded:
    """What a checkpoint or an export folder holds."""

    architecture: str
    backbone: nn.Module
    head: nn.Module | None
    data_config: DataConfig
    class_names: list[str] | None
    provenance: dict[str, Any]
    prediction: dict[str, Any] = field(default_factory=dict)


def _from_checkpoint(path: Path) -> Loaded:
    """A checkpoint's backbone and head, read by state-dict key prefix (no Lightning, no training code; LoRA
    adapters merged)."""
    entry, content = read_checkpoint(path)
    state = content["state_dict"]
    body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    # LoRA adapters are folded into plain weights here: every export and every loaded model is plain timm
    backbone = merged_from_state(
        timm.create_model(entry.backbone, pretrained=False, num_classes=0), body, entry.settings, str(path)
    )
    provenance = {"checkpoint": str(path.resolve()), "initial_weights": entry.initial_weights}
    head = _linear(head_state)
    return Loaded(entry.backbone, backbone, head, entry.data_config, entry.class_names, provenance, entry.prediction)


def _linear(state: dict[str, torch.Tensor]) -> nn.Linear:
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head


def _from_export(folder: Path) -> Loaded:
    config, state = read_export(folder)
    architecture = config["architecture"]
    backbone = timm.create_model(architecture, pretrained=False, num_classes=0)
    prefix = classifier_name(architecture) + "."
    head_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(body, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{folder}: weights do not fit {architecture} (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    head = _linear(head_state) if head_state else None
    ours = export_section(config)
    provenance = {**ours.get("provenance", {}), "export": str(folder.resolve())}
    prediction = ours.get("prediction") or {}
    return Loaded(
        architecture, backbone, head, data_config_from_export(config), config.get("label_names"), provenance, prediction
    )


def _from_adapter(folder: Path) -> Loaded:
    adapter = load_adapter(folder)
    task = adapter.task
    provenance = {"adapter": str(folder.resolve()), "base": task["base"]}
    return Loaded(
        task["architecture"], adapter.backbone, _linear(adapter.head_state), DataConfig.from_dict(task["data_config"]),
        task["class_names"], provenance, task["prediction"],
    )  # fmt: skip


def load(path: str | Path) -> Loaded:
    """Read an export folder (or its ``model.safetensors``), a LoRA adapter folder (``export --adapter_only``:
    its base rebuilt from the recorded source and checked) or a vision-transfer checkpoint."""
    path = Path(path)
    if is_adapter_folder(path):
        return _from_adapter(path)
    if path.is_dir():
        return _from_export(path)
    if path.is_file() and (path.parent / CONFIG_NAME).is_file() and path.suffix == ".safetensors":
        return _from_export(path.parent)
    if path.is_file():
        return _from_checkpoint(path)
    raise WeightsError(f"{path}: not found (expected an export folder, its model.safetensors, or a .ckpt).")


def load_backbone(path: str | Path) -> tuple[nn.Module, DataConfig]:
    """A headless timm backbone and its data config, from an export folder or a checkpoint."""
    loaded = load(path)
    return loaded.backbone.eval(), loaded.data_config


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A :class:`Classifier` from an export folder (with a head) or a checkpoint."""
    loaded = load(path)
    if loaded.head is None or not loaded.class_names:
        raise WeightsError(f"{path}: has no classifier head (a backbone-only export); use load_backbone().")
    classifier = Classifier(
        loaded.architecture,
        loaded.backbone,
        loaded.head,
        loaded.data_config,
        list(loaded.class_names),
        loaded.prediction,
    )
    classifier.provenance = loaded.provenance
    return classifier.to(device)
