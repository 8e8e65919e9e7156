"""PredictionHead: everything between a classifier's raw logits and its final probabilities.

In order: test-time augmentation views of the input, post-hoc logit adjustment (subtract
``tau * log prior``), temperature, and the average of the views' probabilities. Its output is
*logits* whose softmax (multiclass) or sigmoid (multilabel) are those probabilities, so an
exported graph keeps one input and one output, and a downstream user applies one softmax/sigmoid.
It is plain PyTorch (flip, interpolate): TorchScript and ONNX export it as part of the graph.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from vision_transfer.errors import ConfigError

TtaMode = Literal["none", "flip", "flip_zoom"]
TTA_MODES: tuple[str, ...] = ("none", "flip", "flip_zoom")
ZOOM = 1.15  # the zoomed views: 15% larger, centre-cropped back to the input size


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The input, its horizontal mirror (``flip``), and both zoomed in (``flip_zoom``)."""
    if mode not in TTA_MODES:
        raise ConfigError(f"tta={mode!r}: use one of {', '.join(TTA_MODES)}.")
    views = [images]
    if mode in ("flip", "flip_zoom"):
        views.append(images.flip(-1))
    if mode == "flip_zoom":
        height, width = images.shape[-2:]
        zoomed = F.interpolate(images, scale_factor=ZOOM, mode="bilinear", align_corners=False)
        top, left = (zoomed.shape[-2] - height) // 2, (zoomed.shape[-1] - width) // 2
        zoomed = zoomed[..., top : top + height, left : left + width]
        views += [zoomed, zoomed.flip(-1)]
    return views


class PredictionHead(nn.Module):
    """Wraps ``model`` (normalised images -> raw logits) into images -> final logits.

    Args:
        model: the classifier (backbone + head).
        task: ``multiclass`` (softmax) or ``multilabel`` (sigmoid per class).
        temperature: divides the logits (calibration; 1 = none).
        logit_shift: added to the logits before the temperature (post-hoc logit adjustment:
            ``-tau * log prior``), or None.
        tta: ``none``, ``flip`` or ``flip_zoom``.
    """

    temperature: torch.Tensor
    logit_shift: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        task: Literal["multiclass", "multilabel"] = "multiclass",
        temperature: float = 1.0,
        logit_shift: torch.Tensor | None = None,
        tta: str = "none",
    ) -> None:
        super().__init__()
        tta_views(torch.zeros(1, 3, 2, 2), tta)  # refuse an unknown mode now, not at the first batch
        self.model = model
        self.multilabel = task == "multilabel"
        self.tta = tta
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)
        self.register_buffer(
            "logit_shift", logit_shift if logit_shift is not None else torch.zeros(()), persistent=False
        )

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float() + self.logit_shift) / self.temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = tta_views(images, self.tta)
        if len(views) == 1:
            return self.adjust(self.model(images))
        if self.multilabel:
            probs = torch.stack([self.adjust(self.model(v)).sigmoid() for v in views]).mean(0)
            probs = probs.clamp(1e-7, 1 - 1e-7)
            return probs.log() - (1 - probs).log()  # sigmoid of this is the mean probability
        probs = torch.stack([self.adjust(self.model(v)).softmax(dim=1) for v in views]).mean(0)
        return probs.clamp_min(1e-12).log()  # softmax of this is the mean probability

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images)
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=1)
