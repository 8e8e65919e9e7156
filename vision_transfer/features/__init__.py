"""Feature-extraction cache and fast linear probes on cached features."""

from vision_transfer.features.cache import CacheSpec, FeatureCache
from vision_transfer.features.extract import FeatureExtractor, extract
from vision_transfer.features.probe import ProbeResult, lbfgs_probe, run_probe, sgd_probe

__all__ = [
    "CacheSpec",
    "FeatureCache",
    "FeatureExtractor",
    "ProbeResult",
    "extract",
    "lbfgs_probe",
    "run_probe",
    "sgd_probe",
]
