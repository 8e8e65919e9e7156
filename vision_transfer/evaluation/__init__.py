"""Metrics with one definition each (numpy, no Lightning), and an epoch accumulator for torchmetrics.

The task kinds (:mod:`~vision_transfer.evaluation.kinds`: single- and multi-label, everything that differs
between them) and ``EpochScores`` are loaded on first use, so importing the metrics loads neither torch nor
torchmetrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vision_transfer.evaluation.metrics import (
    ECE_BINS,
    MetricInputError,
    accuracy,
    average_precision,
    average_precision_per_class,
    balanced_accuracy,
    confusion_matrix,
    expected_calibration_error,
    f1_macro,
    f1_micro,
    mean_average_precision,
    nll,
    per_class_recall,
    recall_from_confusion,
    reliability,
    top_k_accuracy,
    top_k_classes,
    top_k_hits,
)

if TYPE_CHECKING:
    from vision_transfer.evaluation.kinds import TaskKind, kind_of_labels, task_kind
    from vision_transfer.evaluation.scores import EpochScores

__all__ = [
    "ECE_BINS",
    "EpochScores",
    "MetricInputError",
    "TaskKind",
    "accuracy",
    "average_precision",
    "average_precision_per_class",
    "balanced_accuracy",
    "confusion_matrix",
    "expected_calibration_error",
    "f1_macro",
    "f1_micro",
    "kind_of_labels",
    "mean_average_precision",
    "nll",
    "per_class_recall",
    "recall_from_confusion",
    "reliability",
    "task_kind",
    "top_k_accuracy",
    "top_k_classes",
    "top_k_hits",
]


def __getattr__(name: str) -> object:
    if name == "EpochScores":
        from vision_transfer.evaluation.scores import EpochScores

        return EpochScores
    if name in ("TaskKind", "kind_of_labels", "task_kind"):
        import vision_transfer.evaluation.kinds as kinds

        return getattr(kinds, name)
    raise AttributeError(name)
