"""LightningModules: what is trained, on top of backbones, data and tuning policies."""

from vision_transfer.tasks.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
