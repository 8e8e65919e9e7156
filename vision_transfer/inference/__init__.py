"""From logits to predictions: temperature calibration, test-time augmentation, per-class thresholds."""

from vision_transfer.inference.calibration import fit_temperature
from vision_transfer.inference.outputs import TTA_MODES, PredictionHead, tta_views
from vision_transfer.inference.thresholds import best_f1_thresholds

__all__ = [
    "TTA_MODES",
    "PredictionHead",
    "best_f1_thresholds",
    "fit_temperature",
    "tta_views",
]
