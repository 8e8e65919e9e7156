"""A feature cache keyed by everything that changes the features, stored as atomic shards.

Layout of ``<root>/<key>/``::

    manifest.json            the key's canonical JSON spec, shard lists, feature dim; written last
    <split>/labels.npy       int64 labels of the split, in sample order
    <split>/shard_00000.npy  float16/float32 rows [i * shard_size, (i + 1) * shard_size)

Each shard is written to a temporary name and renamed, so a half-written shard is never read and
a killed extraction (or one that filled the disk) resumes from its last complete shard. An
advisory file lock keeps two processes from extracting the same key at once.
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
from vision_transfer.files import write_atomic

CACHE_VERSION = 1
DEFAULT_ROOT = Path(os.environ.get("VISION_TRANSFER_CACHE", Path.home() / ".cache" / "vision_transfer" / "features"))
_KEPT_WHEN_FULL = "the complete shards are intact and a rerun resumes from them"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def samples_fingerprint(samples: Samples) -> str:
    """Hash of a split's content: ids, labels and, for files, size and mtime; for arrays, the bytes."""
    digest = hashlib.sha256()
    digest.update(canonical_json([samples.ids, samples.labels.tolist()]).encode())
    if isinstance(samples.items, np.ndarray):
        digest.update(np.ascontiguousarray(samples.items).tobytes())
    else:
        for path in samples.items:
            stat = os.stat(path)
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


@dataclass
class CacheSpec:
    """Everything that changes the features. Its canonical JSON's hash is the cache key."""

    backbone: str
    weights: dict[str, Any]
    data_config: dict[str, Any]
    splits: dict[str, str]  # split -> content fingerprint
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
            "splits": self.splits,
            "features": self.features,
            "transform": self.transform,
            "views": self.views,
            "dtype": self.dtype,
            "precision": self.precision,
            **({"extra": self.extra} if self.extra else {}),
        }

    @property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()[:24]


class FeatureCache:
    """The on-disk features of one :class:`CacheSpec`.

    Args:
        spec: what the features are.
        root: cache folder; ``$VISION_TRANSFER_CACHE`` or ``~/.cache/vision_transfer/features``.
        shard_size: rows per shard (the unit of resumption).
    """

    def __init__(self, spec: CacheSpec, root: str | Path | None = None, shard_size: int = 4096) -> None:
        self.spec = spec
        self.folder = Path(root or DEFAULT_ROOT) / spec.key
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
        return (
            manifest is not None
            and manifest.get("complete", False)
            and set(manifest["splits"]) == set(self.spec.splits)
        )

    def shard_path(self, split: str, index: int) -> Path:
        return self.folder / split / f"shard_{index:05d}.npy"

    def num_shards(self, rows: int) -> int:
        return max(1, -(-rows // self.shard_size))

    def has_shard(self, split: str, index: int) -> bool:
        return self.shard_path(split, index).is_file()

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

    def write_shard(self, split: str, index: int, rows: np.ndarray) -> None:
        path = self.shard_path(split, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_npy(path, rows.astype(self.spec.dtype, copy=False), "feature shard")

    def write_labels(self, split: str, labels: np.ndarray) -> None:
        path = self.folder / split / "labels.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_npy(path, labels.astype(np.int64), "feature labels")

    def finalize(self, rows: dict[str, int], dim: int, class_names: list[str], seconds: float) -> None:
        manifest = {
            "spec": self.spec.to_dict(),
            "key": self.spec.key,
            "complete": True,
            "dim": dim,
            "class_names": class_names,
            "splits": {
                s: {"rows": n, "shards": self.num_shards(n), "shard_size": self.shard_size} for s, n in rows.items()
            },
            "extraction_seconds": round(seconds, 3),
        }
        text = json.dumps(manifest, indent=2) + "\n"
        write_atomic(self.manifest_path, text.encode(), "feature manifest", kept=_KEPT_WHEN_FULL)

    # -- reading -----------------------------------------------------------------------------
    def shards(self, split: str) -> list[np.ndarray]:
        """The split's shards as read-only memory maps (features larger than RAM work)."""
        manifest = self.manifest()
        if manifest is None or split not in manifest["splits"]:
            raise KeyError(f"{self.folder}: no complete {split} split.")
        return [np.load(self.shard_path(split, i), mmap_mode="r") for i in range(manifest["splits"][split]["shards"])]

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32, in RAM) and labels of a split."""
        features = np.concatenate([np.asarray(s, dtype=np.float32) for s in self.shards(split)])
        labels = np.load(self.folder / split / "labels.npy")
        return features, labels


def _save_npy(path: Path, array: np.ndarray, what: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic(path, buffer.getbuffer(), what, kept=_KEPT_WHEN_FULL)
