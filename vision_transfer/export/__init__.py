"""Export trained classifiers and backbones (timm folder, TorchScript, ONNX) and load them back."""

from vision_transfer.export.exporter import export_checkpoint, export_classifier
from vision_transfer.export.loading import Classifier, load, load_backbone, load_classifier

__all__ = ["Classifier", "export_checkpoint", "export_classifier", "load", "load_backbone", "load_classifier"]
