"""Parameter-efficient fine-tuning of any timm backbone: LoRA and DoRA (Hugging Face ``peft``) and BitFit.

``peft='lora'`` adds low-rank adapters to the backbone's linear layers and 1x1 convolutions (attention
qkv/proj and MLP linears of a ViT, pointwise convolutions of a convnet), chosen automatically: every
``nn.Linear`` and every ungrouped 1x1 ``nn.Conv2d`` (not a subclass whose output is not linear in its
weight, such as timm's weight-standardised convolutions, where a merged adapter would compute something
else) whose own forward runs (a module whose weight its parent reads directly, as BEiT's qkv through
``F.linear``, would hold an adapter that never acts, so it is left out). ``peft='bitfit'`` trains the
bias terms only (Ben Zaken et al. 2022). Either way every other backbone parameter gets
``requires_grad=False`` once, at construction (so DDP, the optimizer and autograd never see it), and the
head always trains.

:func:`merged_backbone` folds the adapters into plain weights (what every export holds);
:func:`merged_from_state` does it from a checkpoint's state dict alone.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vision_transfer.errors import CheckpointError, ConfigError
from vision_transfer.tuning.config import DEFAULTS, LORA_OPTIONS, Peft

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class AdapterSummary:
    """What a PEFT setting made trainable in a backbone."""

    kind: Peft
    modules: tuple[str, ...]  # LoRA: the adapted modules; BitFit: the modules whose bias trains
    trainable: int  # backbone parameters that train (adapters or biases)
    total: int  # every backbone parameter, base weights included

    def describe(self) -> str:
        share = 100 * self.trainable / max(1, self.total)
        what = f"LoRA on {len(self.modules)} modules" if self.kind == "lora" else f"BitFit ({len(self.modules)} biases)"
        return f"{what}: {self.trainable:,} of {self.total:,} backbone parameters train ({share:.2f}%)"


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:  # an optional extra: imported only when LoRA is used
        raise ConfigError("peft='lora' needs Hugging Face peft: pip install 'vision-transfer[peft]'.") from e
    return peft


def _linear_in_weight() -> tuple[type[nn.Module], ...]:
    """Layer classes whose output is linear in their weight, so an adapter merges exactly into it. A
    subclass with its own forward may not be (timm's StdConv2d standardises its weight first)."""
    from timm.layers import Conv2dSame, Linear
    from timm.layers.conv2d_same import Conv2dSameExport

    return (nn.Linear, Linear, nn.Conv2d, Conv2dSame, Conv2dSameExport)


def is_candidate(module: nn.Module) -> bool:
    """A layer LoRA can adapt and merge exactly: a linear layer, or an ungrouped 1x1 convolution."""
    if type(module) not in _linear_in_weight():
        return False
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
    )


def called_modules(backbone: nn.Module, names: Iterable[str], input_size: tuple[int, int, int]) -> set[str]:
    """Of ``names``, the modules whose own forward runs in one forward pass (eval mode, no autograd)."""
    names = list(names)
    called: set[str] = set()
    modules = dict(backbone.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: called.add(n)) for n in names]
    training = {m: m.training for m in backbone.modules()}
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, *input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in training.items():
            module.training = mode
    return called


def choose_lora_targets(
    backbone: nn.Module, input_size: tuple[int, int, int], targets: list[str] | None = None
) -> list[str]:
    """The modules LoRA adapts: every candidate layer whose forward runs, or those ``targets`` names.

    Args:
        targets: module names or regular expressions (matched against the whole module name), e.g.
            ``["blocks\\.\\d+\\.attn\\.qkv"]``; None: automatic. Each must match at least one
            candidate layer, and every matched layer must run its own forward, else it is refused.
    """
    candidates = [name for name, module in backbone.named_modules() if name and is_candidate(module)]
    if targets is None:
        called = called_modules(backbone, candidates, input_size)
        chosen = [name for name in candidates if name in called]
        if not chosen:
            raise ConfigError(
                f"peft='lora': {type(backbone).__name__} has no linear layer or 1x1 convolution LoRA can adapt; "
                "use peft='bitfit' or mode='full'."
            )
        return chosen
    chosen = []
    for pattern in targets:
        try:
            matched = [name for name in candidates if re.fullmatch(pattern, name)]
        except re.error as e:
            raise ConfigError(f"lora_targets: {pattern!r} is not a regular expression ({e}).") from e
        if not matched:
            raise ConfigError(
                f"lora_targets: {pattern!r} matches no linear layer or 1x1 convolution of "
                f"{type(backbone).__name__} (e.g. {', '.join(candidates[:4])})."
            )
        chosen += [name for name in matched if name not in chosen]
    bypassed = sorted(set(chosen) - called_modules(backbone, chosen, input_size))
    if bypassed:
        raise ConfigError(
            f"lora_targets: {bypassed[:3]} never run their own forward in {type(backbone).__name__} (their parent "
            "reads the weight directly), so an adapter there would never act; leave them out."
        )
    return chosen


def _plain_pointwise_convs(backbone: nn.Module, targets: list[str]) -> None:
    """Targeted 1x1 convolutions of a ``Conv2d`` subclass (timm's ``Conv2dSame``: 'same' padding of a 1x1
    kernel is none at any stride) become plain ``nn.Conv2d`` holding the same parameters, in place: the
    same outputs, and a layer peft can build its conv adapter from (peft >= 0.22 builds it as
    ``type(base_layer)(..., padding_mode=...)``, which ``Conv2dSame`` refuses)."""
    for name in targets:
        module = backbone.get_submodule(name)
        if not isinstance(module, nn.Conv2d) or type(module) is nn.Conv2d:
            continue
        plain = nn.Conv2d(
            module.in_channels, module.out_channels, 1, stride=(module.stride[0], module.stride[1]),
            bias=module.bias is not None,
            device=module.weight.device, dtype=module.weight.dtype,
        )  # fmt: skip
        plain.weight, plain.bias = module.weight, module.bias
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, plain)


def add_lora(
    backbone: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, dora: bool = False
) -> nn.Module:
    """Inject LoRA (DoRA with ``dora``) adapters into ``targets``, in place; only the adapters train."""
    peft = _peft()
    _plain_pointwise_convs(backbone, targets)
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora, target_modules=pattern)
    peft.inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)
    for name, param in backbone.named_parameters():
        param.requires_grad_(".lora_" in name)
    return backbone


def mark_bitfit(backbone: nn.Module) -> list[str]:
    """Only bias terms train (``requires_grad=False`` elsewhere); returns the trained names."""
    biases = [name for name, _ in backbone.named_parameters() if name.rsplit(".", 1)[-1].endswith("bias")]
    if not biases:
        raise ConfigError(
            f"peft='bitfit': {type(backbone).__name__} has no bias terms, so only the head would train; "
            "use mode='linear_probe' for that."
        )
    for name, param in backbone.named_parameters():
        param.requires_grad_(name in biases)
    return biases


def apply_peft(
    backbone: nn.Module,
    kind: Peft,
    input_size: tuple[int, int, int],
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    dora: bool = False,
    targets: list[str] | None = None,
) -> AdapterSummary | None:
    """Make ``backbone`` parameter-efficient in place (None for ``none``)."""
    if kind == "none":
        return None
    total = sum(p.numel() for p in backbone.parameters())
    if kind == "bitfit":
        names = mark_bitfit(backbone)
    elif kind == "lora":
        names = choose_lora_targets(backbone, input_size, targets)
        add_lora(backbone, names, r, alpha, dropout, dora)
    else:
        raise ConfigError(f"peft={kind!r}: choose none, lora or bitfit.")
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    return AdapterSummary(kind, tuple(names), trainable, total)


def has_adapters(backbone: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in backbone.named_parameters())


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A plain timm backbone with every adapter folded into its layer's weight (a copy; the module
    itself when it has none): its keys are timm's, its outputs the adapted model's."""
    if not has_adapters(backbone):
        return backbone
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(backbone)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)  # refuses to write NaN or inf into the weights
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    merged.requires_grad_(True)
    if has_adapters(merged):
        raise ConfigError(f"{type(backbone).__name__}: adapters left after merging (a nested adapter layer).")
    return merged


def lora_layout(state: dict[str, torch.Tensor]) -> tuple[list[str], int, bool] | None:
    """The adapted modules, rank and DoRA of a backbone state dict with LoRA adapters; None without."""
    targets = sorted({key.split(".lora_A.")[0] for key in state if ".lora_A." in key})
    if not targets:
        return None
    rank = int(state[f"{targets[0]}.lora_A.{ADAPTER_NAME}.weight"].shape[0])
    return targets, rank, any(".lora_magnitude_vector." in key for key in state)


def merged_from_state(
    backbone: nn.Module, state: dict[str, torch.Tensor], settings: dict[str, Any], source: str
) -> nn.Module:
    """Load a checkpoint's backbone state into a plain timm ``backbone``, merging LoRA adapters first:
    the adapted modules, rank and DoRA are read from the state's keys, ``lora_alpha`` from ``settings``."""
    layout = lora_layout(state)
    if layout is None:
        _load(backbone, state, source)
        return backbone
    targets, rank, dora = layout
    add_lora(backbone, targets, rank, float(settings.get("lora_alpha", 16.0)), 0.0, dora)
    _load(backbone, state, source)
    return merged_backbone(backbone).eval()


def _load(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit {type(backbone).__name__} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})."
        )


def without_adapters(settings: dict[str, Any]) -> dict[str, Any]:
    """A model's settings for its merged, plain form: ``peft='none'``, the LoRA options at their defaults."""
    plain = {**settings, "peft": "none"}
    for name in LORA_OPTIONS:
        plain[name] = getattr(DEFAULTS, name)
    return plain
