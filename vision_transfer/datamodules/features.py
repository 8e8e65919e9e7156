"""CachedFeatureDataModule: an image datamodule's splits served as cached backbone features."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vision_transfer.backbones import DataConfig, state_fingerprint
from vision_transfer.data.dataset import FeatureBatch
from vision_transfer.datamodules.image import ImageDataModule, augmentation_settings
from vision_transfer.errors import CacheError, ConfigError, DataError
from vision_transfer.features.cache import FeatureCache
from vision_transfer.features.extract import FeatureExtractor, build_spec, extract_splits, feature_caches

FEATURE_SPLITS = ("train", "val")


class FeatureSource(Protocol):
    """What features are extracted with: a model's own backbone (an ``ImageClassifier`` is one)."""

    backbone: nn.Module
    data_config: DataConfig
    weights_source: dict[str, Any]

    @property
    def backbone_name(self) -> str: ...


def precision_of(trainer_precision: str | int | None) -> str:
    """The extraction precision that matches a Trainer's (``bf16-mixed`` -> ``bf16``...)."""
    text = str(trainer_precision)
    return "bf16" if text.startswith("bf16") else "16" if text.startswith("16") else "32"


class _Features(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]


def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> FeatureBatch:
    return FeatureBatch(torch.stack([f for f, _ in items]), torch.stack([y for _, y in items]))


class CachedFeatureDataModule(pl.LightningDataModule):
    """Train and validate a head on cached features of ``images``' splits; test and predict on images.

    The features come from the backbone of ``source``, the model trained on them (built for
    ``images``: :meth:`ImageClassifier.for_data`), taken when the loaders are built: after a checkpoint is restored,
    so a resumed or re-validated run uses the weights the model actually holds. They are keyed by
    those weights' provenance and checked against the backbone's content fingerprint recorded at
    extraction; a mismatch is refused. Missing splits are extracted on the Trainer's device, at
    the precision matching the Trainer's, and shared with ``vision-transfer extract``/``probe``.
    Labels always come from ``images`` (the cache holds features only), and so does the training
    order (``balanced_sampling``). The features are of the eval transform: training augmentation
    beyond the default light one is refused (the default one is not applied).

    Args:
        images: the image datamodule whose splits are served.
        source: the model whose backbone extracts the features (an ``ImageClassifier`` with
            ``cache_features=True``); it must preprocess as ``images`` does.
        cache_dir: feature cache folder; None: the model's ``cache_dir`` option, else ``$VISION_TRANSFER_CACHE``.
        batch_size: feature rows per batch; None uses ``images``' batch size.
        extract_batch_size: images per extraction batch.
    """

    yields_features: ClassVar[bool] = True  # what a cache_features=True model checks before it fits

    def __init__(
        self,
        images: ImageDataModule,
        source: FeatureSource,
        cache_dir: str | None = None,
        batch_size: int | None = None,
        extract_batch_size: int = 256,
    ) -> None:
        super().__init__()
        images.check_for_extraction()
        hp: Any = images.hparams
        changed = augmentation_settings(scale_min=hp.scale_min, hflip=hp.hflip, color_jitter=hp.color_jitter)
        if images.augment_preset not in ("none", "light") or changed:
            setting = ", ".join(
                [f"augment={hp.augment!r}"] if images.augment_preset not in ("none", "light") else changed
            )
            raise ConfigError(
                f"{setting}: cached features are extracted once, with the eval transform, so training "
                "augmentation cannot apply; drop it, or train without cache_features."
            )
        if images.data_config is not None and images.data_config != source.data_config:
            raise ConfigError(
                f"{images.describe()} preprocesses with {images.data_config}, the model extracting its features with "
                f"{source.data_config}; build the model for this data (ImageClassifier.for_data)."
            )
        self.images = images
        self.source = source
        self.cache_dir = cache_dir if cache_dir is not None else getattr(source, "hparams", {}).get("cache_dir")
        self.batch_size = batch_size or images.batch_size
        self.extract_batch_size = extract_batch_size
        self.caches: dict[str, FeatureCache] = {}

    # -- the images' class information and preprocessing ------------------------------------
    @property
    def data_config(self) -> DataConfig | None:
        return self.images.data_config

    @property
    def class_names(self) -> list[str]:
        return self.images.class_names

    @property
    def task(self) -> str:
        return self.images.task

    def class_counts(self) -> Any:
        return self.images.class_counts()

    @property
    def splits(self) -> dict[str, Any]:
        return self.images.splits

    def prepare_splits(self) -> dict[str, Any]:
        return self.images.prepare_splits()

    def describe(self) -> str:
        return f"{self.images.describe()} (cached features)"

    # -- Lightning ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.images.trainer = self.trainer
        self.images.setup(stage)

    def _feature_loader(self, split: str, shuffle: bool) -> DataLoader:
        features = torch.from_numpy(self._cache(split).load())
        labels = torch.from_numpy(self.images.splits[split].labels)
        sampler = self.images.train_sampler(labels.numpy()) if shuffle else None
        return DataLoader(_Features(features, labels), batch_size=self.batch_size, sampler=sampler, collate_fn=_collate)

    def _cache(self, split: str) -> FeatureCache:
        """The split's features, extracted now if missing, from the weights the source holds now."""
        if split not in self.images.splits:
            raise DataError(f"{self.images.describe()}: no {split} split.")
        source = self.source
        trainer = self.trainer
        precision = precision_of(trainer.precision if trainer is not None else None)
        spec = build_spec(source.backbone_name, source.weights_source, source.data_config, precision=precision)
        missing = {
            name: cache
            for name, cache in feature_caches(spec, self._wanted(), self.cache_dir).items()
            if name not in self.caches
        }
        self.caches.update(missing)
        cache = self.caches[split]
        fingerprint = state_fingerprint(source.backbone)
        incomplete = {name: c for name, c in missing.items() if not c.is_complete()}
        if incomplete:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            memory_format = _memory_format(source.backbone)
            extractor = FeatureExtractor(source.backbone, source.data_config, device, precision)
            extract_splits(
                extractor, incomplete, source.data_config, batch_size=self.extract_batch_size,
                num_workers=self.images.num_workers,
            )  # fmt: skip
            source.backbone.to(memory_format=memory_format)  # type: ignore[call-overload]  # the extractor made it NHWC
        recorded = (cache.manifest() or {}).get("weights_fingerprint")
        if recorded and recorded != fingerprint:
            raise CacheError(
                f"{cache.folder}: these features were extracted from other weights than the backbone now holds "
                f"(recorded {recorded[:12]}, now {fingerprint[:12]}); refusing to train or score on them. "
                "Delete that folder to extract again."
            )
        return cache

    def _wanted(self) -> dict[str, Any]:
        return {name: s for name, s in self.images.splits.items() if name in FEATURE_SPLITS}

    def train_dataloader(self) -> DataLoader:
        return self._feature_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._feature_loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.images.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.images.predict_dataloader()

    @property
    def predict_files(self) -> list[str]:
        return self.images.predict_files

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch if isinstance(batch, FeatureBatch) else self.images.on_before_batch_transfer(batch, dataloader_idx)


def _memory_format(module: nn.Module) -> torch.memory_format:
    weight = next((p for p in module.parameters() if p.ndim == 4), None)
    if weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
