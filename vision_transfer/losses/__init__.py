"""Training losses for single-label and multi-label heads, including those for imbalanced classes."""

from vision_transfer.losses.classification import (
    CrossEntropyLoss,
    MultiLabelLoss,
    balanced_class_weights,
    log_prior,
)

__all__ = ["CrossEntropyLoss", "MultiLabelLoss", "balanced_class_weights", "log_prior"]
