"""Export and import in timm's own folder format: ``config.json`` + ``model.safetensors``.

Plain timm (no vision-transfer installed) rebuilds an export with either of::

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    timm.create_model(arch, pretrained=True, num_classes=n,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors", num_classes=n))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from vision_transfer.backbones import DataConfig
from vision_transfer.backbones.weights import load_file
from vision_transfer.errors import WeightsError
from vision_transfer.evaluation.kinds import SINGLE, task_kind

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def classifier_name(architecture: str) -> str:
    """timm's attribute path of the classifier of ``architecture`` (``classifier``, ``fc``, ``head.fc``...)."""
    cfg = timm.models.get_pretrained_cfg(architecture)
    name = getattr(cfg, "classifier", None) or "classifier"
    return name[0] if isinstance(name, (list, tuple)) else name


def timm_state_dict(backbone: nn.Module, head: nn.Module | None, architecture: str) -> dict[str, torch.Tensor]:
    """A headless backbone's weights plus our linear head, under timm's key names."""
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    if head is not None:
        prefix = classifier_name(architecture)
        state.update({f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()})
    return state


def write_export(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    *,
    architecture: str,
    data_config: DataConfig,
    num_features: int,
    class_names: list[str] | None,
    provenance: dict[str, Any],
    prediction: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` (timm's hub schema plus a ``vision_transfer`` section) and weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_classes = len(class_names) if class_names else 0
    pretrained_cfg = {
        **data_config.to_dict(),
        "num_classes": num_classes,
        "classifier": classifier_name(architecture),
    }
    ours: dict[str, Any] = {"provenance": provenance, "format": 1}
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": num_features,
        "pretrained_cfg": pretrained_cfg,
        "vision_transfer": ours,
    }
    if prediction:
        kind = task_kind(prediction.get("task", SINGLE))
        config |= kind.timm_config(prediction)
        final = kind.activation
        ours["prediction"] = prediction
        ours["note"] = (
            "timm.create_model builds the plain model: it outputs raw logits. The prediction settings "
            "(temperature, logit_shift, tta, thresholds) apply on top: logits + logit_shift, divided by the "
            f"temperature, then {final}; the TorchScript and ONNX files include them."
        )
    if class_names:
        config["label_names"] = list(class_names)
    save_file(state_dict, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "architecture": architecture})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_export(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights of an export folder."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no {CONFIG_NAME}; not a vision-transfer or timm export folder.")
    config = json.loads(config_path.read_text())
    if "architecture" not in config:
        raise WeightsError(f"{config_path}: no 'architecture' key.")
    weights = next((folder / n for n in (WEIGHTS_NAME, "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise WeightsError(f"{folder}: no {WEIGHTS_NAME}.")
    return config, load_file(weights)


def export_section(config: dict[str, Any]) -> dict[str, Any]:
    """The ``vision_transfer`` section of an export's ``config.json`` (provenance, prediction settings)."""
    section = config.get("vision_transfer")
    return section if isinstance(section, dict) else {}


def data_config_from_export(config: dict[str, Any]) -> DataConfig:
    cfg = config.get("pretrained_cfg", {})
    fields = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return DataConfig.from_dict({k: cfg[k] for k in fields if k in cfg})
