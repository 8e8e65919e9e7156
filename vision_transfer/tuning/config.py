"""TuningConfig: every option of how a backbone is fine-tuned, with its one default."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from vision_transfer.errors import ConfigError

Mode = Literal["linear_probe", "full", "gradual", "lp_ft", "partial"]
BnPolicy = Literal["train", "frozen_stats", "frozen"]
Unit = Literal["epoch", "step"]
Optimizer = Literal["adamw", "sgd"]
Scheduler = Literal["cosine", "plateau", "constant"]
Peft = Literal["none", "lora", "bitfit"]
# the options that act only with peft='lora'
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_dora", "lora_targets")


@dataclass(frozen=True)
class TuningConfig:
    """Which stage groups train when, how fast, and how BatchNorm behaves.

    ``ImageClassifier`` takes these as flat arguments (what LightningCLI reads from YAML) and
    its defaults are these fields' defaults; a new mode or option is added here once.

    Attributes:
        mode: ``linear_probe`` (backbone frozen), ``full`` (everything trains), ``gradual``
            (ULMFiT: head only, then one more stage group, top down, at each milestone), ``lp_ft``
            (linear probe for ``lp_epochs``, then a full fine-tune from that head at ``lr``),
            ``partial`` (top ``trainable_groups`` only).
        bn: ``frozen_stats`` (BatchNorm of frozen groups, and with ``peft`` every BatchNorm, in eval
            mode), ``train`` (their running statistics keep updating) or ``frozen`` (every BatchNorm in
            eval mode).
        trainable_groups: ``partial``: how many top stage groups train.
        unfreeze_every: ``gradual``: one more group every this many epochs (or steps).
        unfreeze_milestones: ``gradual``: explicit epochs (or steps) instead.
        milestone_unit: ``epoch`` or ``step``, for the two options above.
        lp_epochs: ``lp_ft``: epochs of linear probing (at ``head_lr``) before the fine-tune.
        rewarm: restart the warmup for each group when it is unfrozen.
        optimizer: ``adamw`` or ``sgd`` (with Nesterov momentum).
        lr: learning rate of the backbone's top stage group (and of the head after LP-FT's probe).
        head_lr: learning rate of the head; None uses ``lr``.
        layer_decay: each stage group below the top gets ``lr`` times this, once more per step down.
        weight_decay: decoupled weight decay, not applied to biases and norm parameters.
        momentum: SGD momentum.
        adam_betas: AdamW's (beta1, beta2), the decay rates of its gradient and squared-gradient averages
            (PyTorch's default; fastai's Adam uses (0.9, 0.99)).
        warmup_epochs: linear warmup length, in (fractional) epochs, before the cosine decay.
        min_lr_ratio: the cosine schedule ends at this fraction of each group's learning rate.
        scheduler: ``cosine`` (per step, with warmup, following the unfreezing schedule),
            ``plateau`` (ReduceLROnPlateau on ``val/acc``, per epoch) or ``constant``.
        plateau_factor: ``plateau``: factor applied to every group's learning rate.
        plateau_patience: ``plateau``: epochs without improvement before a reduction.
        peft: what of a trainable stage group trains: ``none`` (all of it), ``lora`` (low-rank adapters on
            its linear layers and 1x1 convolutions, chosen automatically; Hugging Face ``peft``) or
            ``bitfit`` (its bias terms); the base weights stay frozen, the head always trains, and
            exports hold the merged plain weights. Combines with every mode that trains the backbone
            (``full``: adapters from the first step; ``lp_ft``: probe, then adapters).
        lora_r: ``lora``: the adapters' rank.
        lora_alpha: ``lora``: their scale is ``lora_alpha / lora_r``.
        lora_dropout: ``lora``: dropout on the adapters' input.
        lora_dora: ``lora``: DoRA (Liu et al. 2024): adapt the direction, train the magnitude apart.
        lora_targets: ``lora``: module names or regular expressions to adapt instead of the automatic
            choice (e.g. ``blocks\\.\\d+\\.attn\\.qkv``).
    """

    mode: Mode = "full"
    bn: BnPolicy = "frozen_stats"
    trainable_groups: int = 1
    unfreeze_every: int = 1
    unfreeze_milestones: list[int] | None = None
    milestone_unit: Unit = "epoch"
    lp_epochs: int = 1
    rewarm: bool = False
    optimizer: Optimizer = "adamw"
    lr: float = 1e-3
    head_lr: float | None = None
    layer_decay: float = 1.0
    weight_decay: float = 0.01
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    scheduler: Scheduler = "cosine"
    plateau_factor: float = 0.3
    plateau_patience: int = 2
    peft: Peft = "none"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_dora: bool = False
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.adam_betas)  # YAML gives a list: one form, so == compares values
        object.__setattr__(self, "adam_betas", betas)
        checks = [
            ("lr", self.lr > 0, "must be > 0"),
            ("head_lr", self.head_lr is None or self.head_lr > 0, "must be > 0"),
            ("layer_decay", 0 < self.layer_decay <= 1, "must be in (0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("adam_betas", len(betas) == 2 and all(0 <= b < 1 for b in betas), "must be two numbers in [0, 1)"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("lp_epochs", self.lp_epochs >= 0, "must be >= 0"),
            ("unfreeze_every", self.unfreeze_every >= 1, "must be at least 1"),
            ("trainable_groups", self.trainable_groups >= 0, "must be >= 0"),
            ("plateau_factor", 0 < self.plateau_factor < 1, "must be in (0, 1)"),
            ("lora_r", self.lora_r >= 1, "must be at least 1"),
            ("lora_alpha", self.lora_alpha > 0, "must be > 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)"),
            ("lora_targets", self.lora_targets is None or len(self.lora_targets) > 0, "give at least one, or None"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {rule}.")
        if self.unfreeze_milestones is not None and any(m < 0 for m in self.unfreeze_milestones):
            raise ConfigError(f"unfreeze_milestones={self.unfreeze_milestones}: milestones must be >= 0.")
        if self.peft != "none" and self.mode == "linear_probe":
            raise ConfigError(
                f"peft={self.peft!r} trains part of the backbone, but mode='linear_probe' trains the head only; "
                "use mode='full' (or 'lp_ft' to probe first)."
            )

    def inert_options(self) -> list[str]:
        """``name=value (acts only with ...)`` for each option set away from its default where it
        cannot act: accepting it would change nothing, silently, so the classifier refuses it."""
        gradual = self.mode == "gradual"
        where = {
            "trainable_groups": (self.mode == "partial", "mode='partial'"),
            "unfreeze_every": (gradual, "mode='gradual'"),
            "unfreeze_milestones": (gradual, "mode='gradual'"),
            "milestone_unit": (gradual, "mode='gradual'"),
            "lp_epochs": (self.mode == "lp_ft", "mode='lp_ft'"),
            "rewarm": (self.mode in ("gradual", "lp_ft") and self.scheduler == "cosine", "mode='gradual' or 'lp_ft'"),
            "layer_decay": (self.mode != "linear_probe", "a mode that trains the backbone"),
            "bn": (
                self.mode != "full" or self.peft != "none" or self.bn == "frozen",
                "a mode that freezes stage groups, peft, or bn='frozen'",
            ),
            "momentum": (self.optimizer == "sgd", "optimizer='sgd'"),
            "adam_betas": (self.optimizer == "adamw", "optimizer='adamw'"),
            "warmup_epochs": (self.scheduler == "cosine", "scheduler='cosine'"),
            "min_lr_ratio": (self.scheduler == "cosine", "scheduler='cosine'"),
            "plateau_factor": (self.scheduler == "plateau", "scheduler='plateau'"),
            "plateau_patience": (self.scheduler == "plateau", "scheduler='plateau'"),
            **{name: (self.peft == "lora", "peft='lora'") for name in LORA_OPTIONS},
        }
        return [
            f"{name}={getattr(self, name)!r} (acts only with {context})"
            for name, (acts, context) in where.items()
            if not acts and getattr(self, name) != getattr(DEFAULTS, name)
        ]

    @property
    def effective_head_lr(self) -> float:
        return self.lr if self.head_lr is None else self.head_lr

    @property
    def phase_start(self) -> int | None:
        """``lp_ft``: the epoch at which the fine-tune phase begins (every stage group starts training, with
        its own warmup and decay, and the head moves from ``head_lr`` to ``lr``); None in the one-phase modes."""
        return self.lp_epochs if self.mode == "lp_ft" else None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TuningConfig:
        """The config from a mapping that may hold other keys too (a model's hyperparameters)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


DEFAULTS = TuningConfig()
