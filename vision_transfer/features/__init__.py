"""Feature-extraction cache and fast linear probes on cached features (no Lightning here)."""

from vision_transfer.features.cache import FeatureCache, FeatureSpec, content_fingerprint
from vision_transfer.features.extract import FeatureExtractor, extract, extract_splits, feature_caches
from vision_transfer.features.probe import ProbeResult, lbfgs_probe, run_probe, sgd_probe

__all__ = [
    "FeatureCache",
    "FeatureExtractor",
    "FeatureSpec",
    "ProbeResult",
    "content_fingerprint",
    "extract",
    "extract_splits",
    "feature_caches",
    "lbfgs_probe",
    "run_probe",
    "sgd_probe",
]
