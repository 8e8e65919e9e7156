"""A LoRA fine-tune as its adapter alone, in Hugging Face PEFT's format, plus the identity of its base weights:
many task adapters can then share one copy of a backbone.

The folder holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` (``PeftModel.from_pretrained(
timm_backbone, folder)`` reads them), our ``head.safetensors`` and ``task.json`` (classes, preprocessing,
prediction settings and the base: architecture, weights source and a content fingerprint of the base weights
the adapter was trained on). :func:`load_adapter` rebuilds the base from its source, refuses one whose
fingerprint differs (other weights, or BatchNorm statistics that moved during training), and merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vision_transfer.backbones import create_backbone
from vision_transfer.backbones.weights import state_fingerprint
from vision_transfer.checkpoint import read_checkpoint
from vision_transfer.errors import ExportError, WeightsError
from vision_transfer.tuning.adapters import ADAPTER_NAME, add_lora, lora_layout, merged_backbone

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # the key prefix PeftModel saves and reads
TASK_NAME = "task.json"
HEAD_WEIGHTS = "head.safetensors"


def export_adapter(checkpoint: str | Path, to: str | Path) -> dict[str, Any]:
    """Write a LoRA checkpoint's adapter, head and base identity into ``to``; returns what was written."""
    import peft

    entry, content = read_checkpoint(checkpoint)
    body = {k.removeprefix("backbone."): v for k, v in content["state_dict"].items() if k.startswith("backbone.")}
    layout = lora_layout(body)
    if layout is None:
        raise ExportError(
            f"{checkpoint}: has no LoRA adapters (peft={entry.settings.get('peft', 'none')!r}); export the whole "
            "model (without --adapter_only)."
        )
    targets, rank, dora = layout
    backbone = timm.create_model(entry.backbone, pretrained=False, num_classes=0)
    base = {k.replace(".base_layer.", "."): v for k, v in body.items() if ".lora_" not in k}
    backbone.load_state_dict(base)
    fingerprint = state_fingerprint(backbone)
    settings = entry.settings
    add_lora(backbone, targets, rank, float(settings.get("lora_alpha", 16.0)), 0.0, dora)
    backbone.load_state_dict(body)
    adapter = peft.get_peft_model_state_dict(backbone, adapter_name=ADAPTER_NAME)
    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in adapter.items()}, str(folder / ADAPTER_WEIGHTS))
    configs: Any = backbone.peft_config  # set by peft when it injects
    config = configs[ADAPTER_NAME]
    config.lora_dropout = float(settings.get("lora_dropout", 0.0))  # what it trained with (inert at inference)
    config.save_pretrained(str(folder))
    head = {k.removeprefix("head."): v.contiguous() for k, v in content["state_dict"].items() if k.startswith("head.")}
    save_file(head, str(folder / HEAD_WEIGHTS))
    task = {
        "format": 1,
        "architecture": entry.backbone,
        "base": {
            "weights": settings.get("weights", "auto"),
            "image_size": settings.get("image_size"),
            "initial_weights": entry.initial_weights,
            "fingerprint": fingerprint,
        },
        "class_names": entry.class_names,
        "data_config": entry.data_config.to_dict(),
        "prediction": entry.prediction,
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    (folder / TASK_NAME).write_text(json.dumps(task, indent=2) + "\n")
    return {
        "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_WEIGHTS, TASK_NAME],
        "adapter_parameters": sum(v.numel() for v in adapter.values()),
        "base_fingerprint": fingerprint,
    }


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter folder read back: its ``task.json``, the base with the adapter merged, the head's weights."""

    task: dict[str, Any]
    backbone: nn.Module
    head_state: dict[str, torch.Tensor]


def load_adapter(folder: str | Path, weights: str | None = None) -> LoadedAdapter:
    """Rebuild an adapter folder's base from its source, check it, and merge the adapter into it.

    Args:
        weights: the base weights (default: the source ``task.json`` records); their content must be the
            base the adapter was trained on.
    """
    import peft

    folder = Path(folder)
    task = json.loads((folder / TASK_NAME).read_text())
    base_record = task["base"]
    source = weights or base_record["weights"]
    backbone, _ = create_backbone(task["architecture"], source, image_size=base_record.get("image_size"))
    found = state_fingerprint(backbone)
    if found != base_record["fingerprint"]:
        raise WeightsError(
            f"{folder}: the base weights from {source!r} are not the ones this adapter was trained on "
            f"(content fingerprint {found[:12]}..., expected {base_record['fingerprint'][:12]}...; trained from "
            f"{base_record['initial_weights']}). Give the right ones with weights=..., or export the merged model."
        )
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    config = peft.LoraConfig.from_pretrained(str(folder))
    peft.inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)
    result: Any = peft.set_peft_model_state_dict(backbone, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{folder}: the adapter does not fit {task['architecture']} (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]})."
        )
    return LoadedAdapter(task, merged_backbone(backbone).eval(), load_file(str(folder / HEAD_WEIGHTS)))


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and (path / TASK_NAME).is_file()
