"""LightningDataModules for image folders, CSVs, Fashion-MNIST and scikit-learn's digits.

A datamodule is built whole: its transforms come from the :class:`DataConfig` it is constructed
with (:func:`vision_transfer.backbones.preprocessing` gives the one a model uses; the command line
links it from the model's arguments), so the data is preprocessed the way the backbone expects; a
trained model's classes and task, given at construction too, fix the label indices.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vision_transfer.backbones import DataConfig
from vision_transfer.data.dataset import (
    ImageBatch,
    ImageDataset,
    SkippingBatch,
    UnreadableImage,
    collate_images,
    collate_readable,
    list_predict_files,
)
from vision_transfer.data.images import DECODES, Decode
from vision_transfer.data.sources import (
    Samples,
    SourceSplits,
    read_csv,
    read_fashion_mnist,
    read_image_folder,
    read_sklearn_digits,
    stratification_key,
    stratified_split,
    stratified_subset,
)
from vision_transfer.data.transforms import (
    AUGMENT_PRESETS,
    AugmentPreset,
    create_eval_transform,
    create_train_transform,
    decode_side,
    smallest_crop,
)
from vision_transfer.errors import ConfigError, DataError, ImageLoadError
from vision_transfer.evaluation.kinds import TaskKind, TaskOption, kind_of_flag, kind_of_labels, task_kind
from vision_transfer.files import paths_as_text

log = logging.getLogger(__name__)
Data = TypeVar("Data", bound="ImageDataModule")


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)``: a resumed run sees the same order.

    Lightning calls ``set_epoch`` at each epoch start (as it does for ``DistributedSampler``,
    which replaces this sampler under DDP and is seeded the same way).
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class BalancedSampler(DistributedSampler):
    """Draws ``len(labels)`` indices per epoch, with replacement, each with probability inversely
    proportional to its class's frequency (multi-label rows: their rarest class's), so every class
    is seen about equally often. Seeded by ``(seed, epoch)``; under ``torch.distributed`` each rank
    takes its share of one global draw (a ``DistributedSampler``, so Lightning leaves it in place
    and sets its epoch), so resumed and multi-process runs draw what a single run would.
    """

    def __init__(self, labels: np.ndarray, seed: int = 0) -> None:
        key = stratification_key(labels)
        counts = np.bincount(key, minlength=int(key.max()) + 1).astype(np.float64)
        self.weights = torch.as_tensor(1.0 / counts[key], dtype=torch.float64)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = torch.distributed.get_world_size() if distributed else 1
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.seed, self.epoch = seed, 0
        self.shuffle, self.drop_last = True, False  # what Lightning may read of a DistributedSampler
        self.total = len(labels)
        self.num_samples = -(-self.total // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(
            self.weights, self.num_samples * self.num_replicas, replacement=True, generator=generator
        )
        return iter(draw[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _remap(labels: np.ndarray, remap: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels of the source's classes -> labels of a model's classes (multi-label: columns moved)."""
    if labels.ndim == 1:
        return remap[labels]
    out = np.zeros((len(labels), num_classes), dtype=labels.dtype)
    out[:, remap] = labels
    return out


def _label_text(label: np.ndarray, names: list[str]) -> str:
    if np.ndim(label) == 1:
        return ";".join(names[c] for c in np.flatnonzero(label))
    return names[int(label)]


_AUGMENT_DEFAULTS = {"scale_min": 0.35, "hflip": 0.5, "color_jitter": 0.0}


def augmentation_settings(**values: float) -> list[str]:
    """``name=value`` of the augmentation settings that differ from their defaults."""
    return [f"{k}={v}" for k, v in values.items() if k in _AUGMENT_DEFAULTS and v != _AUGMENT_DEFAULTS[k]]


class ImageDataModule(pl.LightningDataModule):
    """Base class: reads a source, splits it (seeded, stratified) and serves DataLoaders.

    Args:
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes; None uses ``min(8, cpu_count)``.
        val_fraction: share of train held out for validation when the source has no val split.
        test_fraction: share of train held out for test when the source has no test split.
        split_seed: seed of those splits and of the subsets; recorded in ``splits.csv``.
        max_train_samples: class-balanced subset of train (None: all).
        max_val_samples: class-balanced subset of val (None: all).
        max_test_samples: class-balanced subset of test (None: all).
        scale_min: smallest area fraction of the random resized crop.
        hflip: probability of a horizontal flip.
        color_jitter: brightness/contrast/saturation jitter strength (0 disables it).
        augment: training augmentation: ``light`` (random resized crop + flip; also ``True``),
            ``medium`` (+ TrivialAugmentWide + random erasing), ``strong`` (RandAugment m9, crops
            from 8% of the area, random erasing), or ``none``/``False`` (the eval transform).
        balanced_sampling: draw training samples with probability inversely proportional to
            their class's frequency (multi-label: of their rarest class), with replacement, as
            many per epoch as the training split has; seeded by epoch (resume and DDP give the
            same draws).
        verify_images: open every image header at setup, so bad files fail before training.
        on_bad_image: ``error`` stops at the first unreadable image, naming it; ``skip`` fully
            decodes every image at setup, leaves out the bad ones and lists them, with the reason,
            in ``skipped_images.csv`` in the run folder; an image that becomes unreadable later
            is left out of its batch and added to that list.
        decode: ``reduced`` (default) decodes a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT
            scaling) when that still leaves every resize a downscale (the shorter side the transform
            needs: :func:`~vision_transfer.data.transforms.decode_side`); ``full`` decodes every pixel
            (bit-equal to timm's eval pipeline); ``fast``: ``reduced``'s pixels through simplejpeg (the
            ``[fast]`` extra), with less overhead than PIL. Other formats and arrays decode in full, and so
            does feature extraction (which refuses ``fast``: :meth:`check_for_extraction`).
        predict_paths: folder(s), image file(s) or ``.txt`` lists of paths to predict.
        data_config: the preprocessing (size, crop, interpolation; the model normalises): the model's,
            from :func:`vision_transfer.backbones.preprocessing` (the command line links it from the
            model's arguments, or a checkpoint's). None: no loaders can be built (the classes can be read).
        classes: a trained model's classes, in its head order: the labels index them, and a label
            outside them is refused. None: the source's classes (sorted), for training a new model.
        task: a trained model's task kind: data of another kind is refused; ``auto``: the labels'.
    """

    yields_features: ClassVar[bool] = False  # what a cache_features=True model checks before it fits

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        scale_min: float = 0.35,
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        augment: bool | AugmentPreset = True,
        balanced_sampling: bool = False,
        verify_images: bool = True,
        on_bad_image: Literal["error", "skip"] = "error",
        decode: Decode = "reduced",
        predict_paths: str | list[str] | None = None,
        data_config: DataConfig | dict[str, Any] | None = None,
        classes: list[str] | None = None,
        task: TaskOption = "auto",
    ) -> None:
        super().__init__()
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= fraction < 1:
                raise ConfigError(f"{name}={fraction}: must be in [0, 1).")
        if augment not in (True, False, *AUGMENT_PRESETS):
            raise ConfigError(f"augment={augment!r}: use one of {', '.join(AUGMENT_PRESETS)} (or true/false).")
        changed = augmentation_settings(scale_min=scale_min, hflip=hflip, color_jitter=color_jitter)
        if augment in (False, "none") and changed:
            raise ConfigError(f"{', '.join(changed)}: augment={augment!r} trains on the eval transform; drop them.")
        if augment == "strong" and "scale_min" in changed:
            raise ConfigError(f"scale_min={scale_min}: augment='strong' crops from 8% of the area; drop one of them.")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"val_fraction={val_fraction} + test_fraction={test_fraction} = {val_fraction + test_fraction:g}: "
                "must be < 1, or nothing is left to train on (lower one of them)."
            )
        if task != "auto":
            task_kind(task)  # an unknown kind is refused here
        if decode not in DECODES:
            raise ConfigError(f"decode={decode!r}: use one of {', '.join(DECODES)}.")
        if decode == "fast" and importlib.util.find_spec("simplejpeg") is None:
            raise ConfigError("decode='fast' needs simplejpeg: pip install 'vision-transfer[fast]' or use reduced.")
        if classes is not None and len(classes) < 2:
            raise ConfigError(f"classes={classes}: a classifier needs at least 2 classes.")
        # what the model shares with its data stays out of the hyperparameters: Lightning logs them merged with
        # the model's, which hold the same values resolved (and a checkpoint records them there, once)
        self.save_hyperparameters(ignore=["data_config", "classes", "task"])
        paths_as_text(self.hparams)
        self.data_config = DataConfig.from_dict(data_config) if isinstance(data_config, dict) else data_config
        self._classes = list(classes) if classes is not None else None
        self._task = task
        self.batch_size = batch_size
        self.predict_paths = predict_paths
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self._class_names: list[str] | None = None  # read with the splits
        self.splits: dict[str, Samples] = {}
        self.predict_files: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.run_dir: Path | None = None

    @abstractmethod
    def read_source(self) -> SourceSplits:
        """Read the source's class names and whatever splits it defines."""

    # -- setup ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        config = self._require_data_config()
        if stage == "predict":
            self.predict_files = list_predict_files(self.predict_paths or [])
            return
        if not self.splits:  # reading the classes may have made them already
            self.prepare_splits()
        if self.trainer is not None and getattr(self, "_recorded_for", None) is not self.trainer:
            self._recorded_for = self.trainer
            self._record_splits()
        hp: Any = self.hparams
        eval_tf = create_eval_transform(config)
        preset = self.augment_preset
        train_tf = (
            create_train_transform(
                config, preset=preset, scale=(hp.scale_min, 1.0), hflip=hp.hflip, color_jitter=hp.color_jitter
            )
            if preset != "none"
            else eval_tf
        )
        skip = hp.on_bad_image == "skip"
        eval_side = decode_side(config)
        train_side = eval_side if preset == "none" else decode_side(config, smallest_crop(preset, hp.scale_min))
        self.datasets = {
            split: ImageDataset(
                samples,
                train_tf if split == "train" else eval_tf,
                skip_unreadable=skip,
                min_side=train_side if split == "train" else eval_side,
                decode=hp.decode,
            )
            for split, samples in self.splits.items()
        }

    def check_for_extraction(self) -> None:
        """Feature extraction (``extract``, ``probe``, ``inspect``, ``benchmark``, ``cache_features``) decodes every
        image in full, timm's eval pipeline, which the feature cache records; it refuses ``decode='fast'``, a
        request it would not honour (the default ``reduced`` is a speed setting of the image loaders only)."""
        if self.hparams.get("decode") == "fast":
            raise ConfigError(
                "decode='fast': feature extraction decodes every image in full (timm's eval pipeline, which the "
                "feature cache records); drop it there (it applies to the image loaders of fit, test and predict)."
            )

    @property
    def augment_preset(self) -> AugmentPreset:
        augment = self.hparams["augment"]
        return "light" if augment is True else "none" if augment is False else augment  # type: ignore[no-any-return]

    # -- what a model built for this data takes from it (ImageClassifier.for_data; the CLI's links) --
    @property
    def class_names(self) -> list[str]:
        """The classes, in label order: ``classes`` when given, else the source's (read on first use)."""
        if self._classes is not None:
            return list(self._classes)
        if self._class_names is None:
            self.prepare_splits()
        return list(self._class_names or [])

    @property
    def task(self) -> str:
        """The task kind's name: ``task`` when given, else the labels' (the source is read first)."""
        return self.task_kind.name

    @property
    def task_kind(self) -> TaskKind:
        """Single- or multi-label: ``task`` when given, else from the labels (the source is read first)."""
        if self._task != "auto":
            return task_kind(self._task)
        if not self.splits:
            self.prepare_splits()
        return kind_of_labels(self.splits["train"].labels)

    def class_counts(self) -> np.ndarray:
        """Training samples (multi-label: positives) of each class: the prior that class weighting and
        logit adjustment use (the source is read first)."""
        if not self.splits:
            self.prepare_splits()
        return self.splits["train"].class_counts(len(self.class_names))

    def with_options(self: Data, **changes: Any) -> Data:
        """A new datamodule of this class and arguments, ``changes`` replacing some (nothing is read yet)."""
        shared = {"data_config": self.data_config, "classes": self._classes, "task": self._task}
        return type(self)(**{**self.hparams, **shared, **changes})

    def _require_data_config(self) -> DataConfig:
        if self.data_config is None:
            raise DataError(
                f"{type(self).__name__} has no data_config: build it with data_config=preprocessing(backbone, ...) "
                "(vision_transfer.backbones; the command line links it from the model)."
            )
        return self.data_config

    def prepare_splits(self) -> dict[str, Samples]:
        """Read the source and make the train/val/test splits (no Trainer needed); the labels index
        ``classes`` (a trained model's) when given, else the source's classes."""
        source = self.read_source()
        splits = dict(source.splits)
        if self._task not in ("auto", source.task):
            raise DataError(f"{self.describe()}: the data is {source.task}, the model is {self._task}.")
        model_classes = self._classes
        if model_classes is not None:  # a trained model fixes the label indices
            lookup = {name: i for i, name in enumerate(model_classes)}
            unknown = [c for c in source.class_names if c not in lookup]
            if unknown:
                more = "..." if len(model_classes) > 10 else ""
                raise DataError(
                    f"{self.describe()}: label(s) {', '.join(map(repr, unknown[:5]))} are not among the model's "
                    f"{len(model_classes)} classes ({', '.join(model_classes[:10])}{more})."
                )
            remap = np.array([lookup[c] for c in source.class_names], dtype=np.int64)
            splits = {
                k: Samples(s.items, _remap(s.labels, remap, len(model_classes)), s.ids) for k, s in splits.items()
            }
            class_names = list(model_classes)
        else:
            class_names = list(source.class_names)
        if len(class_names) < 2:
            raise DataError(f"{self.describe()}: found {len(class_names)} class; a classifier needs at least 2.")
        hp: Any = self.hparams
        missing = [s for s in ("val", "test") if s not in splits]
        fractions = [hp.val_fraction if s == "val" else hp.test_fraction for s in missing]
        if missing:
            train = splits["train"]
            parts = stratified_split(stratification_key(train.labels), fractions, hp.split_seed)
            splits["train"] = train.take(parts[0])
            for split, part in zip(missing, parts[1:], strict=True):
                splits[split] = train.take(part)
        limits = {"train": hp.max_train_samples, "val": hp.max_val_samples, "test": hp.max_test_samples}
        for split, limit in limits.items():
            if limit is not None and split in splits:
                key = stratification_key(splits[split].labels)
                splits[split] = splits[split].take(stratified_subset(key, limit, hp.split_seed))
        splits = {k: v for k, v in splits.items() if len(v)}
        if model_classes is None:  # training: every class needs an example to learn from
            counts = splits["train"].class_counts(len(class_names))
            absent = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
            if absent:
                kind = kind_of_labels(splits["train"].labels).example
                raise DataError(
                    f"{self.describe()}: class(es) {', '.join(map(repr, absent[:5]))} have no {kind} in the training "
                    "split; add images of them, lower val_fraction/test_fraction or max_train_samples' cut, or "
                    "remove the class."
                )
        if hp.on_bad_image == "skip":
            splits = {name: self._without_bad_images(samples) for name, samples in splits.items()}
        elif hp.verify_images:
            for samples in splits.values():
                if not samples.in_memory:
                    for row in range(len(samples)):
                        samples.check_header(row)
        self._class_names = class_names
        self.splits = splits
        return splits

    def _without_bad_images(self, samples: Samples) -> Samples:
        if samples.in_memory:
            return samples
        keep = []
        for row in range(len(samples)):
            try:
                samples.image(row)
                keep.append(row)
            except ImageLoadError as e:
                self.skipped.append((samples.name(row), e.reason))
        return samples.take(np.asarray(keep, dtype=np.int64))

    def _record_splits(self) -> None:
        """Write which sample went to which split, so the split can be audited and reproduced."""
        if self.trainer is None or self.trainer.logger is None:  # no run folder (logger=False): no files
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        self.run_dir = Path(log_dir) if log_dir else None
        if self.trainer.global_rank != 0 or not log_dir:
            return
        path = Path(log_dir) / "splits.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.skipped:
            with (path.parent / "skipped_images.csv").open("w", newline="") as f:
                csv.writer(f).writerows([("path", "reason"), *self.skipped])
            log.info("skipped %d unreadable image(s): see %s", len(self.skipped), path.parent / "skipped_images.csv")
        names = self.class_names
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "sample", "label"])
            for split, samples in self.splits.items():
                writer.writerows(
                    (split, i, _label_text(label, names)) for i, label in zip(samples.ids, samples.labels, strict=True)
                )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, SkippingBatch):
            self._record_skipped(batch.skipped)
            return ImageBatch(batch.images, batch.labels)
        return batch

    def _record_skipped(self, images: list[UnreadableImage]) -> None:
        """List images that failed in a DataLoader (once each, from every rank) in skipped_images.csv."""
        known = {path for path, _ in self.skipped}
        new = [(image.path, image.reason) for image in images if image.path not in known]
        if not new:
            return
        self.skipped.extend(new)
        if self.run_dir is None:
            return
        listing = self.run_dir / "skipped_images.csv"
        rows = new if listing.is_file() else [("path", "reason"), *new]
        with listing.open("a", newline="") as f:
            csv.writer(f).writerows(rows)
        for path, reason in new:
            log.info("skipped unreadable image %s: %s (listed in %s)", path, reason.rstrip("."), listing)

    def describe(self) -> str:
        """Short name of the source, used in messages."""
        return type(self).__name__

    # -- loaders ----------------------------------------------------------------------------
    def _loader_options(self, dataset: Dataset, training: bool) -> dict[str, Any]:
        """What every loader of this data shares (the map-style ones and the prepared data's stream): batch size,
        workers, the collate (skipping unreadable images when asked), pinned memory on CUDA, and in training
        no last batch of one image (it breaks BatchNorm)."""
        skipping = isinstance(dataset, ImageDataset) and dataset.skip_unreadable
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate_readable if skipping else collate_images,
            "pin_memory": self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
            "drop_last": training and len(dataset) > self.batch_size,  # type: ignore[arg-type]
        }

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            sampler=self._sampler(dataset) if shuffle else None,
            persistent_workers=self.num_workers > 0,
            **self._loader_options(dataset, training=shuffle),
        )

    def _sampler(self, dataset: Dataset) -> Sampler[int]:
        return self.train_sampler(dataset.samples.labels)  # type: ignore[attr-defined]

    def train_sampler(self, labels: np.ndarray) -> Sampler[int]:
        """The training order for these labels: balanced or shuffled, seeded by ``(split_seed, epoch)``.
        Every path that trains on this data's samples (images or cached features) draws with it."""
        seed = self.hparams["split_seed"]
        if self.hparams.get("balanced_sampling"):
            return BalancedSampler(labels, seed)
        return EpochShuffleSampler(len(labels), seed)

    def _split_loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"{self.describe()}: no {split} split.")
        return self._loader(self.datasets[split], shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._split_loader("test")

    def predict_dataloader(self) -> DataLoader:
        samples = Samples(self.predict_files, np.full(len(self.predict_files), -1), self.predict_files)
        config = self._require_data_config()
        transform, side = create_eval_transform(config), decode_side(config)
        return self._loader(ImageDataset(samples, transform, min_side=side, decode=self.hparams["decode"]))


class ImageFolderDataModule(ImageDataModule):
    """A folder with one sub-folder of images per class, optionally inside ``train/``, ``val/``, ``test/``.

    Args:
        root: the folder.
        kwargs: see :class:`ImageDataModule`.
    """

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root

    def read_source(self) -> SourceSplits:
        return read_image_folder(self.root)

    def describe(self) -> str:
        return str(self.root)


class CsvDataModule(ImageDataModule):
    """A CSV of image rows, paths relative to the CSV, with an optional ``split`` column.

    Single-label: ``path,label`` rows. Multi-label: a ``labels`` column of class names separated
    by ``;`` (``cat;dog``; empty: none of the classes), or one 0/1 column per class.

    Args:
        csv_path: the CSV file.
        path_column: column holding image paths.
        label_column: single-label: column holding the class name.
        labels_column: multi-label: column holding the class names, separated by ``label_separator``.
        label_separator: multi-label: the separator within ``labels_column``.
        label_columns: multi-label: one 0/1 column per class, instead of ``labels_column``.
        multilabel: None: multi-label when the CSV has ``labels_column`` and no ``label_column``,
            or ``label_columns`` are given; True or False to say so.
        kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        csv_path: str,
        path_column: str = "path",
        label_column: str = "label",
        labels_column: str = "labels",
        label_separator: str = ";",
        label_columns: list[str] | None = None,
        multilabel: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.csv_path = csv_path
        self.path_column = path_column
        self.label_column = label_column
        self.labels_column = labels_column
        self.label_separator = label_separator
        self.label_columns = label_columns
        self.multilabel = multilabel

    def read_source(self) -> SourceSplits:
        return read_csv(
            self.csv_path, self.path_column, self.label_column, labels_column=self.labels_column,
            label_separator=self.label_separator, label_columns=self.label_columns,
            task="auto" if self.multilabel is None else kind_of_flag(self.multilabel).name,
        )  # fmt: skip

    def describe(self) -> str:
        return str(self.csv_path)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (10 classes of 28x28 grayscale clothing), from its IDX files.

    Args:
        root: folder with the IDX files; None uses Debian's ``dataset-fashion-mnist`` package.
        download: fetch with torchvision when the files are not found (needs the network).
        kwargs: see :class:`ImageDataModule`; the official test split is kept as test.
    """

    def __init__(self, root: str | None = None, download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    def read_source(self) -> SourceSplits:
        return read_fashion_mnist(self.root, self.download)

    def describe(self) -> str:
        return f"Fashion-MNIST ({self.root or 'Debian package'})"


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits; split by ``val_fraction``/``test_fraction``.

    Args:
        kwargs: see :class:`ImageDataModule`.
    """

    def read_source(self) -> SourceSplits:
        return read_sklearn_digits()

    def describe(self) -> str:
        return "digits (scikit-learn)"
