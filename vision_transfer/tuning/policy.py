"""Which stage groups train, how their BatchNorm behaves, and their optimizer groups."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vision_transfer.tuning.groups import stage_groups


class TuningPolicy:
    """Freezes the bottom stage groups of a backbone without touching ``requires_grad``.

    Frozen groups run under ``torch.no_grad()``, so no gradient is computed for them and no
    backward compute is spent on them, while every parameter keeps ``requires_grad=True`` (DDP
    builds its reducer once, from the parameters that require grad when it wraps the model).
    Their modules are put back in eval mode after every ``model.train()``.

    Args:
        backbone: a headless timm model.
        mode: ``linear_probe`` freezes every group, ``full`` none.
        bn: ``frozen_stats`` keeps BatchNorm in frozen groups in eval mode; ``train`` lets their
            running statistics update; ``frozen`` keeps every BatchNorm in eval mode.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: Literal["linear_probe", "full"] = "full",
        bn: Literal["train", "frozen_stats", "frozen"] = "frozen_stats",
    ) -> None:
        self.backbone = backbone
        self.groups = stage_groups(backbone)
        self.bn = bn
        self.num_frozen = len(self.groups) if mode == "linear_probe" else 0
        self._frozen_modules: tuple[int, list[nn.Module]] | None = None

    @property
    def frozen_parameter_names(self) -> set[str]:
        return {name for group in self.groups[: self.num_frozen] for name in group}

    def forward(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        """Backbone features; ``training`` is the mode of the model that owns the backbone."""
        # Lightning restores each submodule's mode attribute directly (not through train()),
        # so the frozen groups' eval mode is re-applied here, where it cannot be bypassed.
        if training:
            self.apply_eval_modes()
        if self.num_frozen == len(self.groups):
            with torch.no_grad():
                return self.backbone(images)
        if self.num_frozen == 0:
            return self.backbone(images)
        raise NotImplementedError("partial freezing lands with progressive unfreezing")

    def frozen_modules(self) -> list[nn.Module]:
        """Largest modules whose parameters all belong to frozen groups."""
        if self._frozen_modules is None or self._frozen_modules[0] != self.num_frozen:
            self._frozen_modules = (self.num_frozen, self._find_frozen_modules())
        return self._frozen_modules[1]

    def _find_frozen_modules(self) -> list[nn.Module]:
        frozen = self.frozen_parameter_names
        if not frozen:
            return []
        if len(frozen) == sum(len(g) for g in self.groups):
            return [self.backbone]
        out: list[nn.Module] = []
        covered: set[str] = set()
        for prefix, module in self.backbone.named_modules():
            if any(prefix.startswith(c + ".") for c in covered):
                continue
            names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
            if names and all(n in frozen for n in names):
                out.append(module)
                covered.add(prefix)
        return out

    def apply_eval_modes(self) -> None:
        """Put frozen groups (and, under ``bn='frozen'``, every BatchNorm) in eval mode."""
        for module in self.frozen_modules():
            module.eval()
            if self.bn == "train":
                for m in module.modules():
                    if isinstance(m, _BatchNorm):
                        m.train()
        if self.bn == "frozen":
            for m in self.backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()


def build_param_groups(
    groups: list[list[str]],
    backbone: nn.Module,
    head: nn.Module,
    *,
    lr: float,
    head_lr: float,
    layer_decay: float = 1.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """One optimizer group per stage group and weight-decay class, plus the head's.

    Learning rates are absolute (``lr * layer_decay ** depth_from_top``), so any scheduler that
    scales ``group["lr"]`` respects them; timm's ``lr_scale`` is only read by timm's schedulers.
    Biases, norm parameters and timm's ``no_weight_decay()`` names get no weight decay.
    """
    params = dict(backbone.named_parameters())
    skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
    out: list[dict[str, Any]] = []

    def add(name: str, named: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        decay = [p for n, p in named if p.ndim > 1 and n not in skip]
        no_decay = [p for n, p in named if not (p.ndim > 1 and n not in skip)]
        for suffix, plist, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if plist:
                out.append({"name": name + suffix, "params": plist, "lr": group_lr, "weight_decay": wd})

    top = len(groups) - 1
    for i, names in enumerate(groups):
        add(f"stage{i}", [(n, params[n]) for n in names], lr * layer_decay ** (top - i))
    add("head", list(head.named_parameters()), head_lr)
    return out
