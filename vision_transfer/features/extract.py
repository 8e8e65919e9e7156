"""Run a frozen backbone once over each split and store the pooled features in a FeatureCache."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm  # text bars: also in notebooks, without ipywidgets

from vision_transfer.backbones import (
    DataConfig,
    create_backbone,
    resolve_data_config,
    resolve_weights,
    state_fingerprint,
)
from vision_transfer.data.dataset import ImageDataset
from vision_transfer.data.sources import Samples
from vision_transfer.data.transforms import Normalize, create_eval_transform
from vision_transfer.features.cache import FeatureCache, FeatureSpec

Precision = Literal["auto", "32", "bf16", "16"]


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto``: bf16 (or fp16) autocast on a GPU, fp32 on the CPU (bf16 is only fast there with AMX;
    on this project's CPU it measured 6x slower than fp32: benchmarks/RESULTS.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    return "32"


class FeatureExtractor:
    """A frozen backbone in inference mode: uint8 batches in, pooled float features out.

    Normalisation runs on the device, inputs are channels_last (faster on this project's CPU too:
    benchmarks/RESULTS.md), and ``precision`` picks autocast. ``compile`` runs the backbone through
    ``torch.compile`` (in place; the first batches are slow).
    ``forward_passes`` counts backbone calls (a warm cache makes none).
    """

    def __init__(
        self, backbone: nn.Module, data_config: DataConfig, device: torch.device, precision: str, compile: bool = False
    ) -> None:
        self.device = device
        self.precision = precision
        self.memory_format = torch.channels_last
        self.backbone = backbone.eval().to(device).to(memory_format=self.memory_format)  # type: ignore[call-overload]
        if compile:
            self.backbone.compile()
        self.normalize = Normalize(data_config, self.memory_format).to(device)
        self.forward_passes = 0

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = self.normalize(images)
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(self.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            features = self.backbone(images)
        self.forward_passes += 1
        return features.float()


def build_spec(
    backbone: str,
    weights: dict[str, Any],
    data_config: DataConfig,
    dtype: str = "float16",
    precision: str = "32",
) -> FeatureSpec:
    return FeatureSpec(
        backbone=backbone, weights=weights, data_config=data_config.to_dict(), dtype=dtype, precision=precision
    )


def feature_spec(
    backbone: str, weights: str | None, *, image_size: int | None = None, dtype: str = "float16", precision: str = "32"
) -> FeatureSpec:
    """The spec of ``backbone`` with ``weights``, without building it: the data config comes from
    timm's ``pretrained_cfg`` of the weights' own tag, as :func:`create_backbone` would give it."""
    source = resolve_weights(backbone, weights)
    data_config = resolve_data_config(backbone, source, image_size)
    return build_spec(backbone, source.to_dict(), data_config, dtype, precision)


def feature_caches(
    spec: FeatureSpec, splits: dict[str, Samples], root: str | Path | None = None
) -> dict[str, FeatureCache]:
    """One cache per split (a split's key depends on its own content only)."""
    return {name: FeatureCache(spec, samples, root) for name, samples in splits.items()}


def extract_splits(
    extractor: FeatureExtractor,
    caches: dict[str, FeatureCache],
    data_config: DataConfig,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, FeatureCache]:
    """Fill every missing shard of ``caches``, one DataLoader per split; under ``torch.distributed``
    each rank takes every ``world_size``-th shard and rank 0 writes each manifest once all are done."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    transform = create_eval_transform(data_config)
    fingerprint: str | None = None
    for name, cache in caches.items():
        with cache.lock() if world == 1 else contextlib.nullcontext():
            if cache.is_complete():
                continue
            start = time.perf_counter()
            todo = [i for i in range(cache.num_shards) if i % world == rank and not cache.has_shard(i)]
            dim = _extract_shards(extractor, cache, todo, transform, name, batch_size, num_workers, progress)
            if world > 1:
                dims = [0] * world
                dist.all_gather_object(dims, dim)
                dim = max(dims)
                dist.barrier()
            if rank == 0:
                if fingerprint is None:
                    fingerprint = state_fingerprint(extractor.backbone)
                dim = dim or _shard_dim(cache)
                cache.finalize(dim, time.perf_counter() - start, fingerprint)
            if world > 1:
                dist.barrier()
    return caches


def _extract_shards(
    extractor: FeatureExtractor,
    cache: FeatureCache,
    todo: list[int],
    transform: Any,
    split: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> int:
    """Run the backbone over the rows of the ``todo`` shards (in order) and write each shard as it fills."""
    if not todo:
        return 0
    rows = [r for index in todo for r in cache.shard_rows(index)]
    loader = DataLoader(
        Subset(ImageDataset(cache.samples, transform), rows),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=extractor.device.type == "cuda",
    )
    pending = iter(todo)
    shard: int | None = next(pending)
    chunks: list[np.ndarray] = []
    buffered, dim = 0, 0
    # closed also on an error, so the bar does not redraw after the error message
    with tqdm(
        total=len(rows), unit="img", disable=not progress, desc=f"extracting {cache.spec.backbone} ({split})"
    ) as bar:
        for images, _ in loader:
            features = extractor(images).cpu().numpy()
            dim = features.shape[1]
            chunks.append(features)
            buffered += len(features)
            bar.update(len(images))
            while shard is not None and buffered >= len(cache.shard_rows(shard)):
                size = len(cache.shard_rows(shard))
                block = np.concatenate(chunks)
                cache.write_shard(shard, block[:size])
                chunks, buffered = [block[size:]], buffered - size
                shard = next(pending, None)
    return dim


def _shard_dim(cache: FeatureCache) -> int:
    return int(np.load(cache.shard_path(0), mmap_mode="r").shape[1])


def extract(
    backbone: str,
    weights: str | None,
    splits: dict[str, Samples],
    *,
    image_size: int | None = None,
    cache_root: str | Path | None = None,
    dtype: Literal["float16", "float32"] = "float16",
    precision: Precision = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    compile: bool = False,
    progress: bool = True,
) -> tuple[dict[str, FeatureCache], FeatureExtractor | None]:
    """Features of ``splits`` from a frozen ``backbone``, reusing every split whose cache is complete.

    Returns the caches (one per split) and the extractor that ran (None when every split was
    already complete, so no backbone was built and no forward pass ran).
    """
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_precision(precision, torch_device)
    spec = feature_spec(backbone, weights, image_size=image_size, dtype=dtype, precision=resolved)
    caches = feature_caches(spec, splits, cache_root)
    if all(cache.is_complete() for cache in caches.values()):
        return caches, None
    model, data_config = create_backbone(backbone, weights, image_size=image_size)
    extractor = FeatureExtractor(model, data_config, torch_device, resolved, compile=compile)
    extract_splits(extractor, caches, data_config, batch_size=batch_size, num_workers=num_workers, progress=progress)
    return caches, extractor
