"""Datamodules over a Hugging Face dataset and over a prepared (litdata) dataset, which streams its training split."""

from __future__ import annotations

import functools
from typing import Any

from torch.utils.data import DataLoader

from vision_transfer.data.dataset import ImageDataset, UnreadableImage
from vision_transfer.data.hf import read_hf
from vision_transfer.data.images import load_image
from vision_transfer.data.prepared import join, read_prepared
from vision_transfer.data.sources import SourceSplits
from vision_transfer.datamodules.image import ImageDataModule
from vision_transfer.errors import ConfigError, DataError


class HFDataModule(ImageDataModule):
    """A Hugging Face dataset: a name on the Hub (network, or the local Hub cache), a folder written by
    ``save_to_disk``, parquet/arrow files (a file, a glob or a folder), or an image folder (the
    ``imagefolder`` builder). Needs the ``[hf]`` extra.

    Args:
        dataset: the name or path.
        image_column: the column of images.
        label_column: the column of labels: a ``ClassLabel``, a list of them (multi-label), or names/integers.
        config: the dataset's configuration (Hub datasets with several).
        splits: ours (train, val, test) -> the dataset's split names; default: train, the first of
            validation/valid/val/dev, test. A split left out is made from train (``val_fraction``, ...).
        revision: the Hub revision (a branch, tag or commit).
        cache_dir: where ``datasets`` caches downloads and conversions (default: its own).
        kwargs: see :class:`ImageDataModule`.
    """

    def __init__(
        self, dataset: str, image_column: str = "image", label_column: str = "label", config: str | None = None,
        splits: dict[str, str] | None = None, revision: str | None = None, cache_dir: str | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.config, self.split_names, self.revision, self.cache_dir = config, splits, revision, cache_dir

    def read_source(self) -> SourceSplits:
        return read_hf(
            self.dataset, self.image_column, self.label_column, config=self.config, splits=self.split_names,
            revision=self.revision, cache_dir=self.cache_dir,
        )  # fmt: skip

    def describe(self) -> str:
        return f"Hugging Face dataset {self.dataset}"


class StreamedItem:
    """litdata's per-sample transform: a chunk record ``{"image": bytes, "index": row}`` -> ``(image, label)``,
    decoded and augmented as :class:`ImageDataset` does for the same row."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __call__(self, record: dict[str, Any]) -> tuple[Any, Any] | UnreadableImage:
        row, data = int(record["index"]), record["image"]
        name = self.dataset.samples.ids[row]
        side, decode = self.dataset.min_side, self.dataset.decode
        return self.dataset.read(row, lambda: load_image(name, data=data, min_side=side, decode=decode))


class PreparedDataModule(ImageDataModule):
    """A dataset written by ``vision-transfer prepare`` (litdata chunks), in a folder or object storage
    (``s3://``, ``gs://``: the user's credentials, as litdata and fsspec find them). Needs the ``[stream]`` extra.

    The training split streams (``litdata.StreamingDataset``): shuffled by ``(split_seed, epoch)``, sharded
    across ranks, nodes and loader workers, and resumable mid-epoch (the loader's state is in each
    checkpoint). Validation, test, feature extraction and ``inspect`` read the chunks by random access.

    Args:
        path: the prepared folder or URL.
        cache_dir: where litdata keeps downloaded chunks (remote data); default: its own.
        verify_images: open every image header at setup (off: ``prepare`` decoded every image already).
        kwargs: see :class:`ImageDataModule`; the splits are the prepared ones (``val_fraction`` and
            ``test_fraction`` apply only to a split it lacks, and not to the streamed train split).
    """

    _stream: Any = None  # the training loader last made, whose position checkpoints record
    _pending: dict[str, Any] | None = None  # a checkpoint's position, for the next loader

    def __init__(self, path: str, cache_dir: str | None = None, verify_images: bool = False, **kwargs: Any) -> None:
        super().__init__(verify_images=verify_images, **kwargs)
        hp: Any = self.hparams
        if hp.balanced_sampling:
            raise ConfigError("balanced_sampling: the prepared train split streams in shuffled order; prepare a "
                              "balanced subset instead, or train on the source datamodule.")  # fmt: skip
        if hp.max_train_samples is not None:
            raise ConfigError(f"max_train_samples={hp.max_train_samples}: the whole prepared train split streams; "
                              "prepare with --data.max_train_samples instead.")  # fmt: skip
        self.path, self.cache_dir = path, cache_dir
        self.metadata: dict[str, Any] = {}

    def read_source(self) -> SourceSplits:
        source, self.metadata = read_prepared(self.path, self.cache_dir)
        return source

    def describe(self) -> str:
        return f"prepared dataset {self.path}"

    def prepare_splits(self) -> dict[str, Any]:
        splits = super().prepare_splits()
        prepared = len(self.metadata["splits"]["train"]["ids"])
        if len(splits["train"]) != prepared:  # a split it lacked was cut from train: the stream would hold it too
            lacking = sorted(set(("val", "test")) - set(self.metadata["splits"]))
            raise DataError(
                f"{self.describe()}: has no {' or '.join(lacking)} split, and the streamed train split cannot give "
                "one up; prepare it with val_fraction/test_fraction > 0 (or from a source that has them)."
            )
        return splits

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (litdata's state), saved in every checkpoint: a resumed run goes on
        mid-epoch with the samples not yet seen. (Lightning's own record of it is skipped whenever the
        loader is made before the checkpoint is restored, as a scheduler's ``estimated_stepping_batches`` does.)"""
        return {"stream": self._stream.state_dict()} if self._stream is not None and self._stream.started else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("stream")
        if self._stream is not None:
            self._stream.pending = position
        else:
            self._pending = position

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        if not isinstance(dataset, ImageDataset):
            raise DataError(f"{self.describe()}: no train split.")
        import litdata

        stream = litdata.StreamingDataset(
            join(self.path, "train"), cache_dir=self.cache_dir, shuffle=True, seed=self.hparams["split_seed"],
            transform=StreamedItem(dataset),
        )  # fmt: skip
        loader = _resumable_loader()(stream, **self._loader_options(dataset, training=True))
        loader.pending, self._pending = self._pending, None
        self._stream = loader
        return loader  # type: ignore[no-any-return]


@functools.cache
def _resumable_loader() -> type:
    """litdata's ``StreamingDataLoader`` that takes a checkpoint's position when its next epoch starts,
    unless that position is an epoch's end."""
    import litdata

    class ResumableStreamingLoader(litdata.StreamingDataLoader):  # type: ignore[misc]
        pending: dict[str, Any] | None = None
        started = False

        def __iter__(self) -> Any:
            position, self.pending = self.pending, None
            if position is not None and position["num_samples_yielded"] < len(self) * self.batch_size:
                self.load_state_dict(position)
            else:  # a new epoch: litdata keeps replaying a loaded position until an epoch runs to its very end
                self.restore = False
            self.started = True
            return super().__iter__()

    return ResumableStreamingLoader
