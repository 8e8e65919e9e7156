"""Per-group learning-rate multipliers that follow the unfreezing schedule.

Every multiplier is a pure function of the optimizer step, so ``LambdaLR`` recomputes it exactly
after a resume (its state is only the step count), and no parameter group is ever added.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from ~0, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def group_lr_lambdas(
    stages: Sequence[int],
    starts: Sequence[float],
    *,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    rewarm: bool = False,
    phase_start: float | None = None,
    head_scale_after_phase: float = 1.0,
) -> list[Callable[[int], float]]:
    """One multiplier per optimizer group.

    Args:
        stages: each optimizer group's stage index (``-1`` for the head).
        starts: the step at which each stage group starts training (``inf``: never); a group is
            at 0 before its start, so logged learning rates show what really trains.
        rewarm: restart a linear warmup for each group from its own start step.
        phase_start: LP-FT: a second phase begins at this step, with its own warmup and cosine;
            the head's multiplier is then scaled by ``head_scale_after_phase``.
    """
    whole = cosine_with_warmup(warmup_steps, total_steps, min_ratio)

    def make(stage: int) -> Callable[[int], float]:
        start = 0.0 if stage < 0 else starts[stage]
        if math.isinf(start):
            return lambda step: 0.0
        if phase_start is not None:
            split = int(phase_start)
            first = cosine_with_warmup(min(warmup_steps, split // 2), split, min_ratio)
            second = cosine_with_warmup(warmup_steps, total_steps - split, min_ratio)
            scale = head_scale_after_phase if stage < 0 else 1.0

            def phased(step: int) -> float:
                if step < split:
                    return first(step) if stage < 0 else 0.0
                return scale * second(step - split)

            return phased

        def gradual(step: int) -> float:
            if step < start:
                return 0.0
            warm = min(1.0, (step - start + 1) / (warmup_steps + 1)) if rewarm and start > 0 else 1.0
            return whole(step) * warm

        return gradual

    return [make(stage) for stage in stages]


def constant_lr_lambdas(
    stages: Sequence[int],
    starts: Sequence[float],
    phase_start: float | None = None,
    head_scale_after_phase: float = 1.0,
) -> list[Callable[[int], float]]:
    """Constant learning rates that still follow the unfreezing schedule: a stage group is at 0
    before its start; with ``phase_start`` (LP-FT) the head's rate is scaled when the fine-tune begins."""

    def make(stage: int) -> Callable[[int], float]:
        if stage < 0:
            if phase_start is None:
                return lambda step: 1.0
            return lambda step: 1.0 if step < int(phase_start) else head_scale_after_phase
        start = starts[stage]
        return lambda step: 0.0 if step < start else 1.0

    return [make(stage) for stage in stages]
