"""Which stage groups train when, how their BatchNorm behaves, their optimizer groups and learning-rate schedule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vision_transfer.errors import ConfigError, UnsupportedBackboneError
from vision_transfer.tuning.config import BnPolicy, Mode, TuningConfig, Unit
from vision_transfer.tuning.groups import stage_groups
from vision_transfer.tuning.schedule import constant_lr_lambdas, group_lr_lambdas

__all__ = ["NEVER", "BnPolicy", "Mode", "TuningPolicy", "Unit", "build_param_groups"]

NEVER = math.inf


class TuningPolicy:
    """Freezes the bottom stage groups of a backbone, on a schedule, without touching ``requires_grad``.

    Frozen groups are a prefix of the groups (unfreezing goes top down). The backbone runs under
    ``torch.no_grad()``, and a forward pre-hook on *every* module that owns a parameter of a
    trainable group switches autograd back on: whichever of them runs first (forward order need
    not follow registration order: shortcuts, re-parameterised branches), every trainable module
    runs with autograd, and frozen groups that run before it cost no backward compute. Every
    parameter keeps ``requires_grad=True`` (DDP builds its reducer once, from the parameters that
    require grad when it wraps the model; with ``find_unused_parameters=True`` it then skips the
    frozen ones). Frozen modules are put back in eval mode before every training forward pass.

    After the first backward pass of each frozen level, :meth:`after_backward` checks that every
    trainable parameter the backbone uses got a gradient: a family that cannot be frozen this way
    is refused with :class:`~vision_transfer.errors.UnsupportedBackboneError`, never trained wrong.

    The trainable set is a pure function of training progress (epoch, step), never stored state,
    so a resumed run trains exactly what an uninterrupted one would.

    The policy also owns the optimization that follows this schedule: :meth:`configure_optimizers`
    builds the parameter groups, the optimizer and the learning-rate schedule of every mode and
    scheduler, and :meth:`finish_probe_phase` moves LP-FT's head rate under ``plateau``.

    Args:
        backbone: a headless timm model.
        config: the tuning options (see :class:`~vision_transfer.tuning.config.TuningConfig`);
            or give them as keyword arguments.
    """

    def __init__(self, backbone: nn.Module, config: TuningConfig | None = None, **options: Any) -> None:
        self.config = config = config if config is not None else TuningConfig(**options)
        self.backbone = backbone
        self.groups = stage_groups(backbone)
        self.mode: Mode = config.mode
        self.bn: BnPolicy = config.bn
        self.milestone_unit: Unit = "epoch" if config.phase_start is not None else config.milestone_unit
        self.starts = self._start_points(config, len(self.groups))
        self.num_frozen = self.frozen_at(0, 0)
        self._params = dict(backbone.named_parameters())
        # the modules that directly own each group's trainable parameters (a pre-hook fires on a module's own
        # call); a parameter that never trains (peft's frozen base weights) needs no autograd where it is used
        self._owners = [
            list(dict.fromkeys(_owner(backbone, n) for n in names if self._params[n].requires_grad))
            for names in self.groups
        ]
        self._hooks: list[Any] = []
        self._hooked_level = -1
        self._grad_on_entry = False
        self._frozen: dict[int, tuple[list[tuple[str, nn.Parameter]], list[nn.Module]]] = {}
        self._checked: set[int] = set()
        self._unused: set[str] | None = None
        self._last_input: torch.Tensor | None = None
        self._warned_leak = False
        self._held = False

    @staticmethod
    def _start_points(config: TuningConfig, n: int) -> list[float]:
        """Epoch (or step) at which each group, bottom to top, starts training."""
        if config.mode == "gradual":
            milestones = sorted(config.unfreeze_milestones or [config.unfreeze_every * (k + 1) for k in range(n)])
            # group i (0 = stem) starts with the (n - i)-th milestone
            return [float(milestones[n - 1 - i]) if n - 1 - i < len(milestones) else NEVER for i in range(n)]
        if config.phase_start is not None:  # lp_ft: every group starts with the fine-tune phase
            return [float(config.phase_start)] * n
        if config.mode == "partial":
            if not 0 <= config.trainable_groups <= n:
                raise ConfigError(f"trainable_groups={config.trainable_groups}: this backbone has {n} stage groups.")
            return [NEVER] * (n - config.trainable_groups) + [0.0] * config.trainable_groups
        return [NEVER if config.mode == "linear_probe" else 0.0] * n

    # -- schedule ----------------------------------------------------------------------------
    def frozen_at(self, epoch: int, step: int) -> int:
        """How many bottom groups are frozen at this point of training."""
        now = epoch if self.milestone_unit == "epoch" else step
        return sum(1 for start in self.starts if start > now)

    def update(self, epoch: int, step: int) -> bool:
        """Move to the frozen set of this point of training (while :meth:`held`, of its start); True when it
        changed."""
        frozen = self.frozen_at(0, 0) if self._held else self.frozen_at(epoch, step)
        changed = frozen != self.num_frozen
        self.num_frozen = frozen
        return changed

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep the first stage's frozen set and head rate whatever the epoch and step: an LR range test
        sweeps one stage, however many epochs its steps span."""
        self._held = True
        try:
            yield
        finally:
            self._held = False

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

    # -- optimization ------------------------------------------------------------------------
    def configure_optimizers(
        self, head: nn.Module, length: Callable[[], tuple[int, float]], monitor: str, fused: bool = False
    ) -> dict[str, Any]:
        """The optimizer and its learning-rate schedule, as a LightningModule's ``configure_optimizers`` returns them.

        One optimizer group per stage group and weight-decay class, plus the head's
        (:func:`build_param_groups`); SGD with Nesterov momentum or AdamW. ``plateau``:
        ``ReduceLROnPlateau`` on ``monitor``, per epoch (see :meth:`finish_probe_phase`); ``cosine``
        and ``constant``: per-step multipliers that hold each group at 0 until it starts training
        (``LambdaLR``, a pure function of the step, so a resume recomputes them exactly).

        Args:
            head: the module after the backbone, which trains from the first step.
            length: returns (optimizer steps in the whole run, optimizer steps per epoch); called
                only by the schedulers that need it (not ``plateau``).
            monitor: the validation metric (higher is better) that drives ``plateau``.
            fused: AdamW runs one kernel per parameter group (CUDA) instead of a loop of small ones.
        """
        t = self.config
        groups = build_param_groups(
            self.groups, self.backbone, head, lr=t.lr, head_lr=t.effective_head_lr,
            layer_decay=t.layer_decay, weight_decay=t.weight_decay,
        )  # fmt: skip
        if t.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, fused=True if fused else None)
        if t.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": monitor}}
        lambdas = self.lr_lambdas([g["stage"] for g in groups], *length())
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_lambdas(self, stages: list[int], total: int, steps_per_epoch: float) -> list[Callable[[int], float]]:
        """The per-step multiplier of each optimizer group (by its stage index, ``-1``: the head) under
        ``cosine`` or ``constant``, for a run of ``total`` optimizer steps."""
        t = self.config
        starts = self.start_steps(steps_per_epoch)
        phase_start = None if t.phase_start is None else t.phase_start * steps_per_epoch
        if t.scheduler == "constant":
            return constant_lr_lambdas(stages, starts, phase_start, self.head_scale_after_phase)
        return group_lr_lambdas(
            stages, starts, total_steps=total, warmup_steps=int(t.warmup_epochs * steps_per_epoch),
            min_ratio=t.min_lr_ratio, rewarm=t.rewarm, phase_start=phase_start,
            head_scale_after_phase=self.head_scale_after_phase,
        )  # fmt: skip

    @property
    def head_scale_after_phase(self) -> float:
        """LP-FT: the factor that takes the head from ``head_lr`` to ``lr`` when the fine-tune begins."""
        return self.config.lr / self.config.effective_head_lr

    def finish_probe_phase(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """LP-FT under ``plateau`` (which scales each group's learning rate in place): the head moves
        from ``head_lr`` to ``lr`` when the fine-tune starts, as the other schedulers' multipliers do.
        Call it at the start of every epoch; applied once (the flag is saved with the optimizer state,
        so a resumed run does not apply it again)."""
        phase_start = self.config.phase_start
        if phase_start is None or self.config.scheduler != "plateau" or epoch < phase_start or self._held:
            return
        for group in optimizer.param_groups:
            if group.get("stage") == -1 and not group.get("finetune_phase"):
                group["lr"] *= self.head_scale_after_phase
                group["finetune_phase"] = True

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
        self._hook_trainable(self.num_frozen)
        if self.num_frozen not in self._checked:
            self._last_input = images.detach()  # for the check after this level's first backward
        self._grad_on_entry = True
        try:
            with torch.no_grad():
                return self.backbone(images)
        finally:
            self._grad_on_entry = False

    def _hook_trainable(self, level: int) -> None:
        if self._hooked_level == level:
            return
        for hook in self._hooks:
            hook.remove()
        modules = dict.fromkeys(m for owners in self._owners[level:] for m in owners)
        self._hooks = [m.register_forward_pre_hook(self._enable_grad) for m in modules]
        self._hooked_level = level

    def _enable_grad(self, module: nn.Module, args: Any) -> None:
        if self._grad_on_entry and not torch.is_grad_enabled():
            torch.set_grad_enabled(True)  # restored when the caller's no_grad() block exits

    # -- after backward ----------------------------------------------------------------------
    def after_backward(self) -> None:
        """Drop gradients that reached frozen parameters; on a level's first step, check that every
        trainable parameter in use got one."""
        self.drop_frozen_grads()
        level = self.num_frozen
        if level in self._checked:
            return
        self._checked.add(level)
        if 0 < level < len(self.groups):
            self._check_trainable_reached(level)
        self._last_input = None

    def drop_frozen_grads(self) -> None:
        """A frozen parameter used after the first trainable module keeps no gradient."""
        leaked = [name for name, param in self._frozen_state()[0] if param.grad is not None]
        for name in leaked:
            self._params[name].grad = None
        if leaked and not self._warned_leak:
            self._warned_leak = True
            warnings.warn(
                f"{type(self.backbone).__name__}: frozen parameters {leaked[:3]} run after the first trainable "
                "module; their gradients are dropped, but backward compute was spent.",
                stacklevel=2,
            )

    def _check_trainable_reached(self, level: int) -> None:
        missing = [  # a parameter its model declares requires_grad=False (efficientvim's `weights`) never trains
            n
            for names in self.groups[level:]
            for n in names
            if self._params[n].requires_grad and self._params[n].grad is None
        ]
        if not missing or self._last_input is None:
            return
        unused = self._unused_parameters(self._last_input, missing)
        wrong = [n for n in missing if n not in unused]
        if wrong:
            raise UnsupportedBackboneError(
                f"{type(self.backbone).__name__}: with {level} of {len(self.groups)} stage groups frozen, trainable "
                f"parameters {wrong[:5]} ({len(wrong)} in all) get no gradient (they are used outside the modules "
                "that own them, before any trainable module runs), so they would silently not train. "
                "Use mode='full' or 'linear_probe' for this backbone."
            )

    def _unused_parameters(self, images: torch.Tensor, candidates: list[str]) -> set[str]:
        """Of ``candidates``, those that get no gradient even with nothing frozen (unused by the forward pass).

        Runs once per frozen level and only when a trainable parameter lacks a gradient; in eval
        mode, so no BatchNorm statistic moves and no dropout draws random numbers.
        """
        modes = {m: m.training for m in self.backbone.modules()}
        self.backbone.eval()
        try:
            with torch.enable_grad():
                out = self.backbone(images[:2])
                params = [self._params[n] for n in candidates]
                grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        finally:
            for module, mode in modes.items():
                module.training = mode
        return {n for n, g in zip(candidates, grads, strict=True) if g is None}

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
        if self.bn == "frozen" or (self.config.peft != "none" and self.bn != "train"):  # peft: the base is frozen
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

    Built once, whatever the unfreezing schedule, so resume and every scheduler see one shape; a
    parameter with ``requires_grad=False`` (peft's frozen base weights) is in none.
    Learning rates are absolute (``lr * layer_decay ** depth_from_top``), so any scheduler that
    scales ``group["lr"]`` respects them; timm's ``lr_scale`` is only read by timm's schedulers.
    Biases, norm parameters and timm's ``no_weight_decay()`` names get no weight decay. Each
    group records its ``stage`` index (``-1`` for the head).
    """
    params = dict(backbone.named_parameters())
    skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
    out: list[dict[str, Any]] = []

    def add(name: str, stage: int, named: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        named = [(n, p) for n, p in named if p.requires_grad]
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
