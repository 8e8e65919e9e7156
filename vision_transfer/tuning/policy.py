"""Which stage groups train when, how their BatchNorm behaves, and their optimizer groups."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vision_transfer.tuning.groups import stage_groups

Mode = Literal["linear_probe", "full", "gradual", "lp_ft", "partial"]
BnPolicy = Literal["train", "frozen_stats", "frozen"]
Unit = Literal["epoch", "step"]
NEVER = math.inf


class TuningPolicy:
    """Freezes the bottom stage groups of a backbone, on a schedule, without touching ``requires_grad``.

    Frozen groups are always a prefix of the network (unfreezing goes top down), so the backbone
    runs under ``torch.no_grad()`` and a forward pre-hook on the first module of the first
    trainable group switches autograd back on: no gradient and no backward compute is spent on
    frozen groups, while every parameter keeps ``requires_grad=True`` (DDP builds its reducer once,
    from the parameters that require grad when it wraps the model; with
    ``find_unused_parameters=True`` it then skips the frozen ones). Frozen modules are put back in
    eval mode before every training forward pass.

    The trainable set is a pure function of training progress (epoch, step), never stored state,
    so a resumed run trains exactly what an uninterrupted one would.

    Args:
        backbone: a headless timm model.
        mode: ``linear_probe`` (every group frozen), ``full`` (none), ``gradual`` (head only, then
            one more group, top down, at each milestone), ``lp_ft`` (linear probe for
            ``lp_epochs``, then everything), ``partial`` (only the top ``trainable_groups``).
        bn: ``frozen_stats`` keeps BatchNorm in frozen groups in eval mode; ``train`` lets their
            running statistics update; ``frozen`` keeps every BatchNorm in eval mode.
        trainable_groups: ``partial``: how many top groups train.
        unfreeze_every: ``gradual``: milestones every this many epochs (or steps).
        unfreeze_milestones: ``gradual``: explicit milestones instead; group ``k`` from the top
            starts training at the k-th one.
        milestone_unit: whether milestones count epochs or optimizer steps.
        lp_epochs: ``lp_ft``: epochs of linear probing before the full fine-tune.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: Mode = "full",
        bn: BnPolicy = "frozen_stats",
        *,
        trainable_groups: int = 1,
        unfreeze_every: int = 1,
        unfreeze_milestones: list[int] | None = None,
        milestone_unit: Unit = "epoch",
        lp_epochs: int = 1,
    ) -> None:
        self.backbone = backbone
        self.groups = stage_groups(backbone)
        self.mode = mode
        self.bn = bn
        self.milestone_unit: Unit = "epoch" if mode == "lp_ft" else milestone_unit
        n = len(self.groups)
        if mode == "gradual":
            if unfreeze_milestones is None and unfreeze_every < 1:
                raise ValueError(f"unfreeze_every={unfreeze_every}: must be at least 1.")
            milestones = sorted(unfreeze_milestones or [unfreeze_every * (k + 1) for k in range(n)])
            # group i (0 = stem) starts with the (n - i)-th milestone
            self.starts = [float(milestones[n - 1 - i]) if n - 1 - i < len(milestones) else NEVER for i in range(n)]
        elif mode == "lp_ft":
            self.starts = [float(lp_epochs)] * n
        elif mode == "partial":
            if not 0 <= trainable_groups <= n:
                raise ValueError(f"trainable_groups={trainable_groups}: this backbone has {n} stage groups.")
            self.starts = [NEVER] * (n - trainable_groups) + [0.0] * trainable_groups
        else:
            self.starts = [NEVER if mode == "linear_probe" else 0.0] * n
        self.num_frozen = self.frozen_at(0, 0)
        self._entries = [_owner(backbone, names[0]) for names in self.groups]
        self._hook: Any = None
        self._hooked_group = -1
        self._grad_on_entry = False
        self._params = dict(backbone.named_parameters())
        self._frozen: dict[int, tuple[list[tuple[str, nn.Parameter]], list[nn.Module]]] = {}
        self._warned_leak = False

    # -- schedule ----------------------------------------------------------------------------
    def frozen_at(self, epoch: int, step: int) -> int:
        """How many bottom groups are frozen at this point of training."""
        now = epoch if self.milestone_unit == "epoch" else step
        return sum(1 for start in self.starts if start > now)

    def update(self, epoch: int, step: int) -> bool:
        """Move to the frozen set of this point of training; True when it changed."""
        frozen = self.frozen_at(epoch, step)
        changed = frozen != self.num_frozen
        self.num_frozen = frozen
        return changed

    def start_steps(self, steps_per_epoch: float) -> list[float]:
        """Optimizer step at which each group starts training (``inf``: never)."""
        scale = steps_per_epoch if self.milestone_unit == "epoch" else 1.0
        return [start * scale for start in self.starts]

    def describe(self) -> str:
        n = len(self.groups)
        if self.num_frozen == n:
            return f"head only (stage groups 0-{n - 1} frozen)"
        span = lambda a, b: f"group {a}" if a == b else f"groups {a}-{b}"  # noqa: E731
        trainable = f"stage {span(self.num_frozen, n - 1)} + head"
        return trainable + (f" ({span(0, self.num_frozen - 1)} frozen)" if self.num_frozen else "")

    @property
    def frozen_parameter_names(self) -> set[str]:
        return {name for group in self.groups[: self.num_frozen] for name in group}

    # -- forward -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        """Backbone features; ``training`` is the mode of the model that owns the backbone."""
        if training:
            # Lightning restores each submodule's mode attribute directly (not through train()),
            # so the frozen groups' eval mode is re-applied here, where it cannot be bypassed.
            self.apply_eval_modes()
        if self.num_frozen == 0 or not torch.is_grad_enabled():
            return self.backbone(images)
        if self.num_frozen == len(self.groups):
            with torch.no_grad():
                return self.backbone(images)
        self._hook_entry(self.num_frozen)
        self._grad_on_entry = True
        try:
            with torch.no_grad():
                return self.backbone(images)
        finally:
            self._grad_on_entry = False

    def _hook_entry(self, group: int) -> None:
        if self._hooked_group == group:
            return
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._entries[group].register_forward_pre_hook(self._enable_grad)
        self._hooked_group = group

    def _enable_grad(self, module: nn.Module, args: Any) -> None:
        if self._grad_on_entry:
            torch.set_grad_enabled(True)  # restored when the caller's no_grad() block exits

    def drop_frozen_grads(self) -> None:
        """Safety net after backward: a frozen parameter used after the switch keeps no gradient."""
        leaked = [name for name, param in self._frozen_state()[0] if param.grad is not None]
        for name in leaked:
            self._params[name].grad = None
        if leaked and not self._warned_leak:
            self._warned_leak = True
            warnings.warn(
                f"{type(self.backbone).__name__}: frozen parameters {leaked[:3]} were used after the first "
                "trainable group started; their gradients are dropped, but backward compute was spent.",
                stacklevel=2,
            )

    # -- modes -------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Largest modules whose parameters all belong to frozen groups."""
        return self._frozen_state()[1]

    def _frozen_state(self) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Module]]:
        """Frozen parameters and modules for the current ``num_frozen``, computed once per value
        (both are used on every training step)."""
        if self.num_frozen not in self._frozen:
            names = self.frozen_parameter_names
            params = [(n, p) for n, p in self._params.items() if n in names]
            self._frozen[self.num_frozen] = (params, self._find_frozen_modules(names))
        return self._frozen[self.num_frozen]

    def _find_frozen_modules(self, frozen: set[str]) -> list[nn.Module]:
        if not frozen:
            return []
        if self.num_frozen == len(self.groups):
            return [self.backbone]
        out: list[nn.Module] = []
        covered: list[str] = []
        for prefix, module in self.backbone.named_modules():
            if any(prefix.startswith(c + ".") for c in covered):
                continue
            names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
            if names and all(n in frozen for n in names):
                out.append(module)
                covered.append(prefix)
        return out

    def apply_eval_modes(self) -> None:
        """Training modes: frozen groups (and, under ``bn='frozen'``, every BatchNorm) in eval
        mode, everything else in train mode (a group unfrozen since the last call included)."""
        self.backbone.train()
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


def _owner(model: nn.Module, parameter_name: str) -> nn.Module:
    path = parameter_name.rpartition(".")[0]
    return model.get_submodule(path) if path else model


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

    Built once, whatever the unfreezing schedule, so resume and every scheduler see one shape.
    Learning rates are absolute (``lr * layer_decay ** depth_from_top``), so any scheduler that
    scales ``group["lr"]`` respects them; timm's ``lr_scale`` is only read by timm's schedulers.
    Biases, norm parameters and timm's ``no_weight_decay()`` names get no weight decay. Each
    group records its ``stage`` index (``-1`` for the head).
    """
    params = dict(backbone.named_parameters())
    skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
    out: list[dict[str, Any]] = []

    def add(name: str, stage: int, named: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        decay = [p for n, p in named if p.ndim > 1 and n not in skip]
        no_decay = [p for n, p in named if not (p.ndim > 1 and n not in skip)]
        for suffix, plist, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if plist:
                out.append({"name": name + suffix, "stage": stage, "params": plist, "lr": group_lr, "weight_decay": wd})

    top = len(groups) - 1
    for i, names in enumerate(groups):
        add(f"stage{i}", i, [(n, params[n]) for n in names], lr * layer_decay ** (top - i))
    add("head", -1, list(head.named_parameters()), head_lr)
    return out
