"""Tuning policies: exactly what is frozen when, in each mode, for several timm families."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from vision_transfer.tuning import TuningPolicy, build_param_groups, group_lr_lambdas

FAMILIES = ["test_efficientnet", "test_resnet", "test_convnext", "test_vit"]


def _backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0)


def _size(model: torch.nn.Module) -> int:
    return model.pretrained_cfg.get("input_size", (3, 32, 32))[-1] if "vit" in model.default_cfg["architecture"] else 32


def _params_in_graph(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors that backward would reach (AccumulateGrad nodes)."""
    seen, stack, leaves = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("family", FAMILIES)
def test_gradual_unfreezes_one_group_per_epoch_top_down(family: str) -> None:
    backbone = _backbone(family)
    policy = TuningPolicy(backbone, mode="gradual", unfreeze_every=1)
    n = len(policy.groups)
    assert n >= 3
    params = dict(backbone.named_parameters())
    x = torch.randn(2, 3, _size(backbone), _size(backbone))
    for epoch in range(n + 2):
        policy.update(epoch, 0)
        expected_frozen = max(0, n - epoch)
        assert policy.num_frozen == expected_frozen
        backbone.zero_grad(set_to_none=True)
        out = policy.forward(x, training=True)
        reached = _params_in_graph(out) if out.grad_fn is not None else set()
        if out.requires_grad:
            out.sum().backward()
        for i, names in enumerate(policy.groups):
            for name in names:
                trains = i >= expected_frozen
                # frozen: outside the autograd graph (no backward compute) and no gradient
                assert (id(params[name]) in reached) == trains, (family, epoch, name)
                assert (params[name].grad is not None) == trains, (family, epoch, name)
        assert all(p.requires_grad for p in params.values())


@pytest.mark.parametrize("family", ["test_efficientnet", "test_resnet", "test_convnext"])
def test_partial_and_lp_ft_freeze_what_they_say(family: str) -> None:
    backbone = _backbone(family)
    partial = TuningPolicy(backbone, mode="partial", trainable_groups=2)
    n = len(partial.groups)
    assert [partial.frozen_at(e, 0) for e in range(3)] == [n - 2] * 3
    lp_ft = TuningPolicy(backbone, mode="lp_ft", lp_epochs=2)
    assert [lp_ft.frozen_at(e, 0) for e in range(4)] == [n, n, 0, 0]
    assert TuningPolicy(backbone, mode="linear_probe").frozen_at(100, 10_000) == n
    assert TuningPolicy(backbone, mode="full").frozen_at(0, 0) == 0


def test_explicit_step_milestones() -> None:
    policy = TuningPolicy(_backbone("test_resnet"), mode="gradual", unfreeze_milestones=[10, 30], milestone_unit="step")
    n = len(policy.groups)
    assert [policy.frozen_at(0, s) for s in (0, 9, 10, 29, 30, 10_000)] == [n, n, n - 1, n - 1, n - 2, n - 2]
    assert policy.start_steps(steps_per_epoch=7)[-2:] == [30.0, 10.0]
    assert math.isinf(policy.start_steps(steps_per_epoch=7)[0])


def test_frozen_batchnorm_statistics_do_not_move_in_partial_mode() -> None:
    backbone = _backbone("test_efficientnet")
    policy = TuningPolicy(backbone, mode="partial", trainable_groups=2)
    backbone.train()
    frozen = policy.frozen_parameter_names
    bn_names = [n for n, m in backbone.named_modules() if isinstance(m, _BatchNorm)]
    before = {n: backbone.get_submodule(n).running_mean.clone() for n in bn_names}
    policy.forward(torch.randn(4, 3, 32, 32), training=True).sum().backward()
    moved = {n for n in bn_names if not torch.equal(backbone.get_submodule(n).running_mean, before[n])}
    frozen_bn = {n for n in bn_names if f"{n}.weight" in frozen}
    assert frozen_bn and not moved & frozen_bn
    assert moved == set(bn_names) - frozen_bn


def test_bn_train_policy_lets_frozen_statistics_update() -> None:
    backbone = _backbone("test_efficientnet")
    policy = TuningPolicy(backbone, mode="linear_probe", bn="train")
    backbone.train()
    before = backbone.bn1.running_mean.clone()
    policy.forward(torch.randn(4, 3, 32, 32), training=True)
    assert not torch.equal(backbone.bn1.running_mean, before)
    assert all(p.grad is None for p in backbone.parameters())


def test_learning_rates_follow_the_unfreezing_schedule() -> None:
    backbone = _backbone("test_resnet")
    policy = TuningPolicy(backbone, mode="gradual", unfreeze_every=1)
    groups = build_param_groups(policy.groups, backbone, torch.nn.Linear(8, 2), lr=0.1, head_lr=0.1, layer_decay=0.5)
    starts = policy.start_steps(steps_per_epoch=10)
    lambdas = group_lr_lambdas(
        [g["stage"] for g in groups], starts, total_steps=100, warmup_steps=0, min_ratio=0.0, rewarm=True
    )
    top = len(policy.groups) - 1
    by_name = dict(zip((g["name"] for g in groups), lambdas, strict=True))
    assert by_name[f"stage{top}"](9) == 0 and by_name[f"stage{top}"](10) > 0
    assert by_name["stage0"](10 * (top + 1) - 1) == 0 and by_name["stage0"](10 * (top + 1)) > 0
    assert by_name["head"](0) == pytest.approx(1.0)


def test_lp_ft_schedule_has_two_phases_and_a_lower_head_rate() -> None:
    lambdas = group_lr_lambdas(
        [-1, 0], [20.0], total_steps=100, warmup_steps=4, min_ratio=0.0, phase_start=20, head_scale_after_phase=0.1
    )
    head, stage = lambdas
    assert stage(19) == 0 and stage(20) < stage(24) == pytest.approx(1.0)
    assert head(1) < head(4) == pytest.approx(1.0) and head(24) == pytest.approx(0.1)


def test_model_without_group_matcher_falls_back_to_its_children_with_a_warning() -> None:
    from vision_transfer.tuning import stage_groups

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match="no timm group_matcher"):
        groups = stage_groups(plain)
    assert groups == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]


def test_a_parameter_used_outside_its_module_before_any_trainable_module_is_refused() -> None:
    """The runtime guard: a trainable weight read functionally by a frozen module (here a tied
    projection whose own module never runs) would get no gradient; the first step says so."""
    from torch import nn

    from vision_transfer.errors import UnsupportedBackboneError

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.proj = nn.Linear(4, 4)  # the top group; only its weight is used, by the stem's caller

        def group_matcher(self, coarse: bool = False) -> dict[str, str]:
            return {"stem": r"^stem", "blocks": r"^proj"}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(self.stem(x), self.proj.weight)

    policy = TuningPolicy(Tied(), mode="partial", trainable_groups=1)
    head = nn.Linear(4, 1)
    head(policy.forward(torch.randn(2, 4), training=True)).sum().backward()
    with pytest.raises(UnsupportedBackboneError, match=r"trainable parameters \['proj.weight'\]"):
        policy.after_backward()
