"""Training losses for single-label and multi-label heads, including those for imbalanced classes."""

from vision_transfer.losses.classification import ClassificationLoss, balanced_class_weights, log_prior

__all__ = ["ClassificationLoss", "balanced_class_weights", "log_prior"]
