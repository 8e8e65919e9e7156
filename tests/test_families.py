"""Prefix freezing on every timm family with a group_matcher, at every freeze level.

One training step (seeded batch of 2, a loss with gradient everywhere it flows, backward,
``drop_frozen_grads``, SGD over every parameter) must give a gradient to every parameter of every
trainable stage group and leave every parameter and every persistent buffer (BatchNorm running
statistics) of every frozen group bit-identical, at every level: partial with 1 .. n-1 trainable
groups, full, linear probe. The bug this guards against: the forward pre-hook that switches autograd
back on sits on the module that owns the first-registered parameter of the first trainable group, so
modules of that group that run before it stay under ``no_grad`` and silently never train.

A family may instead be refused with ``UnsupportedBackboneError`` (at construction or at the first
training step); refusals are reported as ``RefusedBackboneWarning`` in the warnings summary.
Configurations and the known exceptions live in ``tests/family_configs.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

from tests.family_configs import (
    CONFIGS,
    FAMILIES,
    MUST_SUPPORT,
    SHORTEN,
    SLOW,
    UNUSED_IN_FULL,
    VARIANTS,
    WITHOUT_GROUP_MATCHER,
    build,
    has_group_matcher,
    one_thread,
)
from vision_transfer import errors
from vision_transfer.tuning import TuningPolicy

# added by the fix for this bug; until then nothing is accepted as a refusal
UnsupportedBackboneError = getattr(errors, "UnsupportedBackboneError", None)
REFUSAL: tuple[type[BaseException], ...] = (UnsupportedBackboneError,) if UnsupportedBackboneError else ()


class RefusedBackboneWarning(UserWarning):
    """A family that TuningPolicy refuses to freeze partially (shown in the warnings summary)."""


_one_thread = one_thread  # autouse, module-scoped (tests/family_configs.py)


# -- the table ----------------------------------------------------------------------------------------
def test_table_covers_every_family_with_a_group_matcher() -> None:
    """A timm upgrade that adds a family with a group_matcher (or gives one to an excluded family)
    fails here until the family gets a tiny configuration in tests/family_configs.py."""
    modules = set(timm.list_modules())
    missing = sorted(m for m in modules - set(FAMILIES) - WITHOUT_GROUP_MATCHER if has_group_matcher(m))
    gained = sorted(m for m in WITHOUT_GROUP_MATCHER & modules if has_group_matcher(m))
    gone = sorted(set(FAMILIES) - modules)
    assert not missing, f"timm families with a group_matcher missing from FAMILIES: {missing}"
    assert not gained, f"families in WITHOUT_GROUP_MATCHER that now have a group_matcher: {gained}"
    assert not gone, f"FAMILIES entries that are no longer timm modules: {gone}"
    for key, (name, _, _) in CONFIGS.items():
        family = VARIANTS[key][0] if key in VARIANTS else key
        assert name in timm.list_models(module=family), f"{key}: {name} is not a {family} model"
    for key in (*UNUSED_IN_FULL, *SLOW, *MUST_SUPPORT, *SHORTEN):
        assert key in CONFIGS, key


# -- one training step ----------------------------------------------------------------------------------
def _levels(n: int) -> list[str]:
    return [f"partial{t}" for t in range(1, n)] + ["full", "linear_probe"]


def _mode(level: str) -> tuple[str, int]:
    if level.startswith("partial"):
        return "partial", int(level.removeprefix("partial"))
    return level, 1


def _train_step(reference: nn.Module, images: torch.Tensor, level: str) -> tuple[TuningPolicy, nn.Module] | str:
    """A copy of ``reference`` and its policy after one training step at ``level``; or the refusal."""
    backbone = copy.deepcopy(reference)
    mode, trainable = _mode(level)
    try:
        policy = TuningPolicy(backbone, mode=mode, trainable_groups=trainable)  # type: ignore[arg-type]
        torch.manual_seed(0)
        out = policy.forward(images, training=True)
        if out.requires_grad:
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
            (out * weight).sum().backward()
        policy.after_backward()  # the production path: drops leaked gradients, checks each level once
    except REFUSAL as e:
        return str(e)
    torch.optim.SGD(backbone.parameters(), lr=0.1).step()
    return policy, backbone


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (torch.equal calls -0.0 and 0.0 equal, and NaN unequal to itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        a, b = a.detach().contiguous().view(-1), b.detach().contiguous().view(-1)
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _buffer_groups(model: nn.Module, groups: list[list[str]]) -> dict[str, int]:
    """The stage group of each buffer that is model state (in the state dict: BatchNorm statistics, not
    caches such as convit's lazily computed ``rel_indices``): the highest group among the parameters of
    its owning module (or of the nearest ancestor with parameters), so it counts as frozen only when
    all of them are."""
    group_of = {name: i for i, names in enumerate(groups) for name in names}
    persistent = set(model.state_dict(keep_vars=True)) - set(dict(model.named_parameters()))
    out = {}
    for name, _ in model.named_buffers():
        if name not in persistent:
            continue
        path = name.rpartition(".")[0]
        while True:
            module = model.get_submodule(path)
            owned = [f"{path}.{p}" if path else p for p, _ in module.named_parameters()]
            if owned or not path:
                break
            path = path.rpartition(".")[0]
        out[name] = max((group_of[p] for p in owned), default=len(groups) - 1)
    return out


def _describe(model: nn.Module, names: list[str]) -> str:
    """The names, then each owning module with its class."""
    modules: dict[str, str] = {}
    for name in names:
        path = name.rpartition(".")[0]
        modules.setdefault(path, type(model.get_submodule(path)).__name__ if path else type(model).__name__)
    return f"{names}; modules: " + ", ".join(f"{path or '<root>'} ({kind})" for path, kind in modules.items())


def _problems(family: str, level: str, reference: nn.Module, policy: TuningPolicy, backbone: nn.Module) -> list[str]:
    """Everything wrong with one step at ``level``: compares the trained copy with ``reference``."""
    groups = policy.groups
    params, before = dict(backbone.named_parameters()), dict(reference.named_parameters())
    buffers, buffers_before = dict(backbone.named_buffers()), dict(reference.named_buffers())
    n = len(groups)
    mode, trainable = _mode(level)
    expected = {"partial": n - trainable, "full": 0, "linear_probe": n}[mode]
    problems = []
    grouped = [name for names in groups for name in names]
    if sorted(grouped) != sorted(params):
        problems.append(f"stage groups do not hold each parameter exactly once: {sorted(set(params) ^ set(grouped))}")
    if policy.num_frozen != expected:
        problems.append(f"{policy.num_frozen} of {n} groups frozen, expected {expected}")
    frozen = policy.num_frozen
    if off := [name for name, p in params.items() if p.requires_grad != before[name].requires_grad]:
        problems.append(f"requires_grad changed: {off}")

    unused = UNUSED_IN_FULL.get(family, {})
    for i in range(frozen, n):
        if untrained := [name for name in groups[i] if params[name].grad is None and name not in unused]:
            problems.append(
                f"trainable group {i} of {n}: {len(untrained)} of {len(groups[i])} parameters got no gradient: "
                + _describe(backbone, untrained)
            )
    if mode == "full" and (stale := sorted(name for name in unused if params[name].grad is not None)):
        problems.append(f"UNUSED_IN_FULL lists parameters that do get a gradient: {stale}")

    frozen_params = [name for names in groups[:frozen] for name in names]
    if leaked := [name for name in frozen_params if params[name].grad is not None]:
        problems.append(f"frozen parameters kept a gradient: {_describe(backbone, leaked)}")
    if moved := [name for name in frozen_params if not _same(before[name], params[name])]:
        problems.append(f"frozen parameters changed: {_describe(backbone, moved)}")
    frozen_buffers = [name for name, i in _buffer_groups(backbone, groups).items() if i < frozen]
    if moved := [name for name in frozen_buffers if not _same(buffers_before[name], buffers[name])]:
        problems.append(f"buffers of frozen groups changed: {_describe(backbone, moved)}")
    return [f"{level}: {p}" for p in problems]


@pytest.mark.parametrize("family", [pytest.param(k, marks=[pytest.mark.slow] if k in SLOW else []) for k in CONFIGS])
def test_freezing_trains_exactly_the_trainable_groups(family: str) -> None:
    """Every level of one family (or variant): partial 1 .. n-1 trainable groups, full, linear probe."""
    torch.manual_seed(0)
    reference = build(family)  # built once; each level trains a copy, the original is the snapshot
    size = CONFIGS[family][2]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    full = _train_step(reference, images, "full")  # the group count, or a refusal for the whole family
    n = 0 if isinstance(full, str) else len(full[0].groups)
    problems, refused = [], {}
    for level in _levels(n):
        step = full if level == "full" else _train_step(reference, images, level)
        if isinstance(step, str):
            refused[level] = step
        else:
            problems += _problems(family, level, reference, *step)
    if refused:
        assert family not in MUST_SUPPORT, f"{family}: refused, but the rest of the suite relies on it: {refused}"
        assert all(m.strip() for m in refused.values()), f"{family}: refused without a message: {refused}"
        message = next(iter(refused.values()))
        warnings.warn(
            f"{family}: TuningPolicy refuses {sorted(refused)}: {message}", RefusedBackboneWarning, stacklevel=1
        )
    assert not problems, f"{family} ({CONFIGS[family][0]}, {n} stage groups):\n" + "\n".join(problems)
