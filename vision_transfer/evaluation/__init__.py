"""Evaluation of frozen features and trained models (no Lightning): one definition of each metric and
the protocols that use them.

- ``metrics``: numpy metrics, one function per number; ``scores.EpochScores`` accumulates them per epoch.
- ``kinds``: the task kinds (single- and multi-label): everything that differs between them, once.
- ``linear``: linear probes (one multi-head SGD trainer, L-BFGS logistic regression), ``stream``: the
  same SGD probe over shards larger than memory; ``knn``: DINO's weighted k-NN; ``fewshot``: few-shot
  episodes; ``stats``: the one confidence interval.

The metrics are imported here; every other name is loaded on first use, so importing the metrics
loads neither torch, torchmetrics nor scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    from vision_transfer.evaluation.fewshot import FewShotResult, few_shot
    from vision_transfer.evaluation.kinds import TaskKind, kind_of_labels, task_kind
    from vision_transfer.evaluation.knn import KnnResult, knn_evaluate
    from vision_transfer.evaluation.linear import (
        ProbeOptionError,
        ProbeResult,
        Standardizer,
        lbfgs_logistic_regression,
        lbfgs_probe,
        run_probe,
        sgd_probe,
        train_heads,
    )
    from vision_transfer.evaluation.scores import EpochScores
    from vision_transfer.evaluation.stats import mean_ci
    from vision_transfer.evaluation.stream import InsufficientMemoryError, stream_sgd_probe

_LAZY = {
    "EpochScores": "scores",
    "FewShotResult": "fewshot",
    "InsufficientMemoryError": "stream",
    "KnnResult": "knn",
    "ProbeOptionError": "linear",
    "ProbeResult": "linear",
    "Standardizer": "linear",
    "TaskKind": "kinds",
    "kind_of_labels": "kinds",
    "task_kind": "kinds",
    "few_shot": "fewshot",
    "knn_evaluate": "knn",
    "lbfgs_logistic_regression": "linear",
    "lbfgs_probe": "linear",
    "mean_ci": "stats",
    "run_probe": "linear",
    "sgd_probe": "linear",
    "stream_sgd_probe": "stream",
    "train_heads": "linear",
}

__all__ = [
    "ECE_BINS",
    "EpochScores",
    "FewShotResult",
    "InsufficientMemoryError",
    "KnnResult",
    "MetricInputError",
    "ProbeOptionError",
    "ProbeResult",
    "Standardizer",
    "TaskKind",
    "accuracy",
    "average_precision",
    "average_precision_per_class",
    "balanced_accuracy",
    "confusion_matrix",
    "expected_calibration_error",
    "f1_macro",
    "f1_micro",
    "few_shot",
    "kind_of_labels",
    "knn_evaluate",
    "lbfgs_logistic_regression",
    "lbfgs_probe",
    "mean_average_precision",
    "mean_ci",
    "nll",
    "per_class_recall",
    "recall_from_confusion",
    "reliability",
    "run_probe",
    "sgd_probe",
    "stream_sgd_probe",
    "task_kind",
    "top_k_accuracy",
    "top_k_classes",
    "top_k_hits",
    "train_heads",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"vision_transfer.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vision_transfer.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
