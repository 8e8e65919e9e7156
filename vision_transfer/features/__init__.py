"""Feature extraction and the feature cache (no Lightning here); the protocols that read the cache
live in :mod:`vision_transfer.evaluation`."""

from vision_transfer.features.cache import FeatureCache, FeatureSpec, content_fingerprint
from vision_transfer.features.extract import FeatureExtractor, extract, extract_splits, feature_caches

__all__ = [
    "FeatureCache",
    "FeatureExtractor",
    "FeatureSpec",
    "content_fingerprint",
    "extract",
    "extract_splits",
    "feature_caches",
]
