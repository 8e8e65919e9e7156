"""PredictionHead: everything between a classifier's raw logits and its final probabilities.

In order: test-time augmentation views of the input, post-hoc logit adjustment (subtract
``tau * log prior``), temperature, and the average of the views' probabilities. Its output is
*logits* whose activation (the task kind's: softmax or a sigmoid per class) gives those probabilities, so an
exported graph keeps one input and one output, and a downstream user applies one softmax/sigmoid.
It is plain PyTorch (flip, interpolate): TorchScript and ONNX export it as part of the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.nn import functional as F

from vision_transfer.errors import ConfigError

if TYPE_CHECKING:
    from vision_transfer.evaluation.kinds import TaskKind

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
        kind: the task kind (:func:`vision_transfer.evaluation.task_kind`): its activation and view average.
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
        kind: TaskKind,
        temperature: float = 1.0,
        logit_shift: torch.Tensor | None = None,
        tta: str = "none",
    ) -> None:
        super().__init__()
        tta_views(torch.zeros(1, 3, 2, 2), tta)  # refuse an unknown mode now, not at the first batch
        self.model = model
        self.kind = kind
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
        return self.kind.mean_probability_logits([self.adjust(self.model(v)) for v in views])

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.kind.probabilities(self(images))
