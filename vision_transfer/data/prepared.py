"""Prepared datasets: a source's splits written once as litdata's optimized chunks (optionally pre-resized
and re-encoded), then read back by random access or streamed. litdata is the ``[stream]`` extra,
imported here only.

Layout of a prepared dataset (a local folder or an object-store URL, ``s3://...``, ``gs://...``)::

    vision_transfer.json   classes, task, and per split the sample ids and labels, in chunk order
    train/ val/ test/      litdata chunks and index.json; each sample {"image": bytes, "index": int}

Labels stay in ``vision_transfer.json`` (and so can be remapped to a trained model's classes); a sample's
``index`` is its row there.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.data.sources import Samples, SourceSplits
from vision_transfer.errors import ConfigError, DataError

METADATA = "vision_transfer.json"
FORMAT = 1
REMOTE = ("s3://", "gs://", "gcs://", "azure://", "az://", "hf://")


def _litdata() -> Any:
    try:
        import litdata
    except ImportError as e:
        raise DataError("prepared datasets need litdata: pip install 'vision-transfer[stream]'") from e
    return litdata


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE)


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


class _Encoder:
    """One sample of a split as a chunk record: its file's bytes, or a JPEG re-encoded at ``short_side``."""

    def __init__(self, samples: Samples, short_side: int | None, quality: int) -> None:
        self.samples, self.short_side, self.quality = samples, short_side, quality

    def __call__(self, row: int) -> dict[str, Any]:
        return {"image": encode_for_chunks(self.samples, row, self.short_side, self.quality), "index": row}


def encode_for_chunks(samples: Samples, row: int, short_side: int | None, quality: int) -> bytes:
    """The bytes stored for a row: a file's or record's own bytes when it needs no resizing, a lossless PNG
    for decoded arrays, else the image resized to ``short_side`` (shorter side, PIL bicubic with antialiasing)
    and JPEG-encoded at ``quality``."""
    from PIL import Image

    image = samples.image(row)
    large = short_side is not None and min(image.shape[:2]) > short_side
    if not large and not samples.in_memory:
        return samples.content(row)
    picture = Image.fromarray(image)
    buffer = io.BytesIO()
    if large:
        assert short_side is not None
        scale = short_side / min(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=quality)
    else:
        picture.save(buffer, "PNG")
    return buffer.getvalue()


def prepare(
    source: SourceSplits, output: str, *, short_side: int | None = None, quality: int = 90, num_workers: int = 1,
    chunk_bytes: str = "64MB", description: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``source``'s splits as litdata chunks under ``output`` (see the module) and return the metadata.

    Args:
        source: the classes and the train/val/test splits to write (a datamodule's, after its splitting).
        output: an empty or new folder, or an object-store URL.
        short_side: resize images whose shorter side is larger to this (JPEG at ``quality``); None keeps
            every file's bytes as they are (arrays: PNG).
        quality: JPEG quality of resized images.
        num_workers: processes that decode, resize and encode.
        chunk_bytes: size of a chunk.
        description: what to record of the source (its datamodule and options).

    Raises:
        DataError: ``output`` holds files already (nothing is overwritten).
    """
    litdata = _litdata()
    if not 1 <= quality <= 95:
        raise ConfigError(f"quality={quality}: JPEG quality must be in 1-95.")
    if short_side is not None and short_side < 1:
        raise ConfigError(f"short_side={short_side}: must be a positive number of pixels, or None to keep sizes.")
    if not is_remote(output):
        folder = Path(output)
        if folder.exists() and any(folder.iterdir()):
            raise DataError(f"{output}: not empty; prepare into a new folder (nothing was written).")
        folder.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {
        "format": FORMAT, "classes": source.class_names, "task": source.task, "short_side": short_side,
        "quality": quality if short_side is not None else None, "source": description or {}, "splits": {},
        "version": uuid.uuid4().hex,  # a prepared dataset's identity, for the feature cache
    }  # fmt: skip
    for split, samples in source.splits.items():
        litdata.optimize(
            fn=_Encoder(samples, short_side, quality), inputs=list(range(len(samples))),
            output_dir=join(output, split), chunk_bytes=chunk_bytes, num_workers=max(1, num_workers),
            keep_data_ordered=True, reorder_files=False, verbose=False, start_method="fork",
        )  # fmt: skip
        metadata["splits"][split] = {"ids": list(samples.ids), "labels": samples.labels.tolist()}
    _check_order(output, metadata)
    _write_text(join(output, METADATA), json.dumps(metadata) + "\n")
    return metadata


def _check_order(output: str, metadata: dict[str, Any]) -> None:
    """Each split's chunks hold its rows in order (what ``index`` and the labels rely on)."""
    for split, recorded in metadata["splits"].items():
        dataset = _litdata().StreamingDataset(join(output, split))
        if len(dataset) != len(recorded["ids"]):
            raise DataError(f"{join(output, split)}: {len(dataset)} samples written of {len(recorded['ids'])}.")
        for row in {0, len(dataset) // 2, len(dataset) - 1}:
            if dataset[row]["index"] != row:
                raise DataError(f"{join(output, split)}: chunk order differs from the source's at row {row}.")


def _write_text(path: str, text: str) -> None:
    if not is_remote(path):
        Path(path).write_text(text)
        return
    import fsspec

    with fsspec.open(path, "w") as f:
        f.write(text)


def read_metadata(path: str) -> dict[str, Any]:
    """A prepared dataset's ``vision_transfer.json``, locally or from object storage (fsspec)."""
    where = join(path, METADATA)
    try:
        if is_remote(path):
            import fsspec

            with fsspec.open(where, "r") as f:
                text = f.read()
        else:
            text = Path(where).read_text()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no {METADATA}; is it a folder written by `vision-transfer prepare`?") from e
    except ImportError as e:  # fsspec's protocol package (s3fs, gcsfs, adlfs) is missing
        raise DataError(f"{where}: {e}") from e
    metadata: dict[str, Any] = json.loads(text)
    if metadata.get("format") != FORMAT:
        raise DataError(f"{where}: format {metadata.get('format')}, this version reads format {FORMAT}.")
    return metadata


class ChunkImages:
    """:class:`~vision_transfer.data.sources.EncodedImages` read by random access from a split's chunks."""

    def __init__(self, url: str, rows: np.ndarray, version: str, cache_dir: str | None = None) -> None:
        self.url, self.rows, self.version, self.cache_dir = url, rows, version, cache_dir
        self._dataset: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own reader
        return {**self.__dict__, "_dataset": None}

    def encoded(self, row: int) -> bytes:
        if self._dataset is None:
            self._dataset = _litdata().StreamingDataset(self.url, cache_dir=self.cache_dir)
        return self._dataset[int(self.rows[row])]["image"]  # type: ignore[no-any-return]

    def take(self, index: np.ndarray) -> ChunkImages:
        return ChunkImages(self.url, self.rows[index], self.version, self.cache_dir)

    def fingerprint(self) -> str:
        return f"{self.url}:{self.version}:{hashlib.sha256(self.rows.tobytes()).hexdigest()}"


def read_prepared(path: str, cache_dir: str | None = None) -> tuple[SourceSplits, dict[str, Any]]:
    """A prepared dataset's splits as :class:`Samples` over its chunks, and its metadata."""
    metadata = read_metadata(path)
    splits = {}
    for split, recorded in metadata["splits"].items():
        labels = np.asarray(recorded["labels"])
        labels = labels.astype(np.uint8 if labels.ndim == 2 else np.int64)  # 0/1 rows, or class indices
        rows = np.arange(len(labels), dtype=np.int64)
        images = ChunkImages(join(path, split), rows, metadata["version"], cache_dir)
        splits[split] = Samples(images, labels, list(recorded["ids"]))
    return SourceSplits(list(metadata["classes"]), splits), metadata
