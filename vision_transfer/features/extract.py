"""Run a frozen backbone once over each split and store the pooled features in a FeatureCache."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm  # text bars: also in notebooks, without ipywidgets

from vision_transfer.backbones import DataConfig, create_backbone
from vision_transfer.data.dataset import ImageDataset
from vision_transfer.data.sources import Samples
from vision_transfer.data.transforms import Normalize, create_eval_transform
from vision_transfer.features.cache import CacheSpec, FeatureCache, samples_fingerprint

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
    weights: dict,
    data_config: DataConfig,
    splits: dict[str, Samples],
    dtype: str = "float16",
    precision: str = "32",
) -> CacheSpec:
    return CacheSpec(
        backbone=backbone,
        weights=weights,
        data_config=data_config.to_dict(),
        splits={name: samples_fingerprint(samples) for name, samples in sorted(splits.items())},
        dtype=dtype,
        precision=precision,
    )


def extract_splits(
    extractor: FeatureExtractor,
    cache: FeatureCache,
    splits: dict[str, Samples],
    data_config: DataConfig,
    class_names: list[str],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> FeatureCache:
    """Fill ``cache`` with every missing shard; under ``torch.distributed`` each rank takes every
    ``world_size``-th shard and rank 0 writes the manifest once all are done."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    transform = create_eval_transform(data_config)
    start = time.perf_counter()
    dim = int(getattr(extractor.backbone, "num_features", 0))
    with cache.lock() if world == 1 else contextlib.nullcontext():
        if cache.is_complete():
            return cache
        todo = [
            (name, i)
            for name, samples in splits.items()
            for i in range(cache.num_shards(len(samples)))
            if i % world == rank and not cache.has_shard(name, i)
        ]
        total = sum(len(_shard_rows(cache, len(splits[n]), i)) for n, i in todo)
        # closed also on an error, so the bar does not redraw after the error message
        with tqdm(total=total, unit="img", disable=not progress) as bar:
            bar.set_description(f"extracting {cache.spec.backbone}")
            for name, index in todo:
                samples = splits[name]
                rows = _shard_rows(cache, len(samples), index)
                loader = DataLoader(
                    Subset(ImageDataset(samples, transform), list(rows)),
                    batch_size=batch_size,
                    num_workers=num_workers,
                    pin_memory=extractor.device.type == "cuda",
                )
                chunks = []
                for images, _ in loader:
                    chunks.append(extractor(images).cpu().numpy())
                    bar.update(len(images))
                shard = np.concatenate(chunks)
                dim = shard.shape[1]
                cache.write_shard(name, index, shard)
        if world > 1:
            dims = [0] * world
            dist.all_gather_object(dims, dim)
            dim = max(dims)
            dist.barrier()
        if rank == 0:
            for name, samples in splits.items():
                cache.write_labels(name, samples.labels)
            cache.finalize({n: len(s) for n, s in splits.items()}, dim, class_names, time.perf_counter() - start)
        if world > 1:
            dist.barrier()
    return cache


def _shard_rows(cache: FeatureCache, total: int, index: int) -> range:
    return range(index * cache.shard_size, min(total, (index + 1) * cache.shard_size))


def extract(
    backbone: str,
    weights: str | None,
    splits: dict[str, Samples],
    class_names: list[str],
    *,
    image_size: int | None = None,
    cache_root: str | Path | None = None,
    dtype: Literal["float16", "float32"] = "float16",
    precision: Precision = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> tuple[FeatureCache, FeatureExtractor | None]:
    """Features of ``splits`` from a frozen ``backbone``, reusing the cache when its key matches.

    Returns the cache and the extractor that ran (None when the cache was already complete, so no
    backbone was built and no forward pass ran).
    """
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(precision, torch_device)  # type: ignore[assignment]
    from vision_transfer.backbones.create import _check_name
    from vision_transfer.backbones.weights import resolve_weights

    _check_name(backbone)
    source = resolve_weights(backbone, weights)
    # The data config can be derived without the weights: it comes from timm's pretrained_cfg.
    data_config = _data_config(backbone, image_size)
    spec = build_spec(backbone, source.to_dict(), data_config, splits, dtype, precision)
    cache = FeatureCache(spec, cache_root)
    if cache.is_complete():
        return cache, None
    model, data_config = create_backbone(backbone, weights, image_size=image_size)
    extractor = FeatureExtractor(model, data_config, torch_device, precision)
    extract_splits(
        extractor,
        cache,
        splits,
        data_config,
        class_names,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    return cache, extractor


def _data_config(backbone: str, image_size: int | None) -> DataConfig:
    import timm

    with torch.device("meta"):  # no memory, no weights: only the config is wanted
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return DataConfig.from_model(model, image_size)
