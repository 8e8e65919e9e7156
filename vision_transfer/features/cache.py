"""A feature cache: one folder per split, keyed by everything that changes that split's features.

Layout of ``<root>/<key>/`` (one split of one dataset under one :class:`FeatureSpec`)::

    manifest.json            the key's canonical JSON, rows, shards, feature dim, weights fingerprint;
                             written last, so its presence means "complete"
    ids.json                 the sample ids, in row order
    shard_00000.npy          float16/float32 rows [i * shard_size, (i + 1) * shard_size)

The key covers the backbone, its weights, the data config, precision, dtype and the split's
*content* (sample ids and file sizes/mtimes, or the array bytes) but not its labels or class
names: features depend on images only, so a relabelled dataset reuses them, and whoever reads
them takes the labels from the current data. A training run's train/val and a probe's
train/val/test therefore share the shards of the splits they have in common.

Each shard is written to a temporary name and renamed, so a half-written shard is never read and
a killed extraction (or one that filled the disk) resumes from its last complete shard. An
advisory file lock keeps two processes from extracting the same split at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.data.sources import Samples
from vision_transfer.errors import CacheError
from vision_transfer.files import write_atomic

CACHE_VERSION = 2
_KEPT_WHEN_FULL = "the complete shards are intact and a rerun resumes from them"


def default_root() -> Path:
    """``$VISION_TRANSFER_CACHE`` (read at call time), else ``~/.cache/vision_transfer/features``."""
    return Path(os.environ.get("VISION_TRANSFER_CACHE") or Path.home() / ".cache" / "vision_transfer" / "features")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_fingerprint(samples: Samples) -> str:
    """Hash of what a split's images are (:meth:`Samples.fingerprint`); labels do not change features."""
    return samples.fingerprint()


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes features, apart from the images themselves."""

    backbone: str
    weights: dict[str, Any]
    data_config: dict[str, Any]
    features: str = "pooled_pre_logits"
    transform: str = "eval"
    views: int = 1
    dtype: str = "float16"
    precision: str = "32"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        weights = {k: v for k, v in self.weights.items() if k in ("kind", "uri", "sha256")}
        if weights.get("sha256"):  # a content hash identifies the file; its path does not matter
            weights.pop("uri", None)
        return {
            "version": CACHE_VERSION,
            "backbone": self.backbone,
            "weights": weights,
            "data_config": self.data_config,
            "features": self.features,
            "transform": self.transform,
            "views": self.views,
            "dtype": self.dtype,
            "precision": self.precision,
            **({"extra": self.extra} if self.extra else {}),
        }

    def key(self, content: str) -> str:
        """The cache key of a split whose :func:`content_fingerprint` is ``content``."""
        return hashlib.sha256(canonical_json({**self.to_dict(), "content": content}).encode()).hexdigest()[:24]


class FeatureCache:
    """The on-disk features of one split under one :class:`FeatureSpec`.

    Args:
        spec: what the features are.
        samples: the split's samples (their ids and content make the key; their order is the row order).
        root: cache folder; default :func:`default_root`.
        shard_size: rows per shard (the unit of resumption and of streaming reads).
    """

    def __init__(self, spec: FeatureSpec, samples: Samples, root: str | Path | None = None, shard_size: int = 4096):
        self.spec = spec
        self.samples = samples
        self.rows = len(samples)
        self.content = content_fingerprint(samples)
        self.key = spec.key(self.content)
        self.folder = Path(root or default_root()) / self.key
        self.shard_size = shard_size

    # -- state -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def is_complete(self) -> bool:
        manifest = self.manifest()
        return manifest is not None and manifest.get("complete", False) and manifest.get("rows") == self.rows

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.rows // self.shard_size))

    def shard_rows(self, index: int) -> range:
        return range(index * self.shard_size, min(self.rows, (index + 1) * self.shard_size))

    def shard_path(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.npy"

    def has_shard(self, index: int) -> bool:
        return self.shard_path(index).is_file()

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for extraction; a second process waits, then finds the shards done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_shard(self, index: int, rows: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_npy(self.shard_path(index), rows.astype(self.spec.dtype, copy=False), "feature shard")

    def finalize(self, dim: int, seconds: float, weights_fingerprint: str | None = None) -> None:
        """Write the sample ids and the manifest (last: its presence marks the split complete)."""
        ids = (json.dumps(list(self.samples.ids)) + "\n").encode()
        write_atomic(self.folder / "ids.json", ids, "feature ids", kept=_KEPT_WHEN_FULL)
        manifest = {
            "spec": self.spec.to_dict(),
            "key": self.key,
            "content": self.content,
            "complete": True,
            "rows": self.rows,
            "dim": dim,
            "shards": self.num_shards,
            "shard_size": self.shard_size,
            "weights_fingerprint": weights_fingerprint,
            "extraction_seconds": round(seconds, 3),
        }
        text = json.dumps(manifest, indent=2) + "\n"
        write_atomic(self.manifest_path, text.encode(), "feature manifest", kept=_KEPT_WHEN_FULL)

    # -- reading -----------------------------------------------------------------------------
    def _complete_manifest(self) -> dict[str, Any]:
        manifest = self.manifest()
        if manifest is None or not manifest.get("complete"):
            raise CacheError(f"{self.folder}: no complete features for this split (extract them first).")
        return manifest

    def shards(self) -> list[np.ndarray]:
        """The shards as read-only memory maps (features larger than RAM work)."""
        manifest = self._complete_manifest()
        return [np.load(self.shard_path(i), mmap_mode="r") for i in range(manifest["shards"])]

    def load(self) -> np.ndarray:
        """All features of the split, float32, in RAM, in sample order."""
        return np.concatenate([np.asarray(s, dtype=np.float32) for s in self.shards()])

    @property
    def dim(self) -> int:
        return int(self._complete_manifest()["dim"])


def _save_npy(path: Path, array: np.ndarray, what: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getbuffer(), what, kept=_KEPT_WHEN_FULL)
