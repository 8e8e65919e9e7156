"""Every timm family (module of ``timm.models``) with a group_matcher, and its smallest model.

What tests/family_configs.py needs when timm gains a family: for each family, whether its models have
a ``group_matcher``, its ``test_*`` models, its smallest model by parameter count (every model is
built on the meta device: no memory, no init compute) and whether the table already covers it.

    python benchmarks/list_families.py [MODULE ...]   # all families by default; about a minute
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.family_configs import FAMILIES, WITHOUT_GROUP_MATCHER


def survey(module: str) -> tuple[bool, str, int, list[str]]:
    """(has a group_matcher, smallest model, its parameter count, test_* models) of one family."""
    names = timm.list_models(module=module)
    matcher, smallest, size = False, "", 0
    for name in names:
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, num_classes=0)
        except Exception:  # an entry point that needs real tensors at init
            continue
        if not callable(getattr(model, "group_matcher", None)):
            continue
        matcher = True
        count = sum(p.numel() for p in model.parameters())
        if not smallest or count < size:
            smallest, size = name, count
    return matcher, smallest, size, [n for n in names if n.startswith("test_")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="families to survey (default: all)")
    modules = parser.parse_args().modules or timm.list_modules()
    print(f"{'family':28s} {'table':7s} {'smallest model with a group_matcher':40s} {'params':>12s}  test models")
    for module in modules:
        matcher, smallest, size, tests = survey(module)
        table = "yes" if module in FAMILIES else ("exempt" if module in WITHOUT_GROUP_MATCHER else "MISSING")
        if not matcher:
            table = "exempt" if module in WITHOUT_GROUP_MATCHER else "-"
        print(f"{module:28s} {table:7s} {smallest or '(none)':40s} {size:>12,}  {' '.join(tests)}", flush=True)


if __name__ == "__main__":
    main()
