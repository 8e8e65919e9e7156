"""Stage groups of a timm backbone, from its ``group_matcher``, in forward order."""

from __future__ import annotations

import warnings

import torch
from timm.models import group_parameters


def stage_groups(model: torch.nn.Module, coarse: bool = True) -> list[list[str]]:
    """Parameter names of each stage group, bottom (stem) to top.

    timm's ``group_matcher`` defines the groups (stem, each stage, the final conv/norm). A model
    without one falls back to its top-level children, with a warning.
    """
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        try:
            spec = matcher(coarse=coarse)
        except (AssertionError, NotImplementedError):  # e.g. RDNet implements fine grouping only
            spec = matcher(coarse=False)
        grouped = group_parameters(model, spec)
        return [list(names) for _, names in sorted(grouped.items())]
    warnings.warn(
        f"{type(model).__name__} has no timm group_matcher; using its top-level children as stage groups.",
        stacklevel=2,
    )
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(name)
    return list(groups.values())
