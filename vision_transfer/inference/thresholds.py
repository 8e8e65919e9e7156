"""Per-class decision thresholds for multi-label heads, chosen to maximise each class's F1."""

from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 0.5


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """For each class, the probability threshold with the highest F1 on ``(probs, targets)``.

    A prediction is positive when ``prob >= threshold``; the threshold is set midway between the
    chosen probability and the next lower one, so it generalises to scores between them.

    Returns:
        the thresholds ``(C,)``, and the classes without a positive example (left at 0.5).
    """
    probs, targets = probs.float(), targets.float()
    thresholds = torch.full((probs.shape[1],), DEFAULT_THRESHOLD)
    no_positive = []
    for c in range(probs.shape[1]):
        positives = targets[:, c].sum()
        if positives == 0:
            no_positive.append(c)
            continue
        order = probs[:, c].argsort(descending=True)
        sorted_probs, hits = probs[order, c], targets[order, c]
        tp = hits.cumsum(0)
        predicted = torch.arange(1, len(hits) + 1, dtype=torch.float32)
        f1 = 2 * tp / (predicted + positives)
        # only cut between distinct scores: the last position of each run of equal probabilities
        last_of_run = torch.ones_like(sorted_probs, dtype=torch.bool)
        last_of_run[:-1] = sorted_probs[:-1] != sorted_probs[1:]
        f1 = torch.where(last_of_run, f1, torch.full_like(f1, -1.0))
        k = int(f1.argmax())
        lower = sorted_probs[k + 1] if k + 1 < len(sorted_probs) else torch.tensor(0.0)
        thresholds[c] = float((sorted_probs[k] + lower) / 2)
    return thresholds, no_positive
