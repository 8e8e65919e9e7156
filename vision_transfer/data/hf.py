"""Hugging Face ``datasets`` as a source: by name (the Hub), a ``save_to_disk`` folder, parquet/arrow
files or an image folder (the ``imagefolder`` builder). ``datasets`` is the ``[hf]`` extra, imported here only."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.data.sources import SPLITS, Samples, SourceSplits
from vision_transfer.errors import DataError

# the names datasets give their splits, for ours
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
DATA_FILES = (".parquet", ".arrow")


class HFImages:
    """:class:`~vision_transfer.data.sources.EncodedImages` over a dataset's image column (read undecoded)."""

    def __init__(self, dataset: Any, column: str, rows: np.ndarray) -> None:
        from datasets import Image

        self.dataset = dataset.select_columns([column]).cast_column(column, Image(decode=False))
        self.column, self.rows = column, rows

    def __len__(self) -> int:
        return len(self.rows)

    def encoded(self, row: int) -> bytes:
        value = self.dataset[int(self.rows[row])][self.column]
        if value is None:
            raise DataError(f"row {int(self.rows[row])}: no image in column {self.column!r}.")
        if value.get("bytes") is not None:
            return value["bytes"]  # type: ignore[no-any-return]
        return Path(value["path"]).read_bytes()  # the imagefolder builder keeps local files by path

    def take(self, index: np.ndarray) -> HFImages:
        taken = object.__new__(HFImages)
        taken.dataset, taken.column, taken.rows = self.dataset, self.column, self.rows[index]
        return taken

    def fingerprint(self) -> str:
        return f"{self.dataset._fingerprint}:{hashlib.sha256(self.rows.tobytes()).hexdigest()}"


def load_hf(dataset: str, config: str | None = None, revision: str | None = None, cache_dir: str | None = None) -> Any:
    """A ``DatasetDict``: a ``save_to_disk`` folder, parquet/arrow files (a file, a glob or a folder of them),
    an image folder, or else a dataset name on the Hub (the network, or the local Hub cache)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("Hugging Face datasets need the datasets library: pip install 'vision-transfer[hf]'") from e
    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix in DATA_FILES or (path.is_dir() and any(p.suffix in DATA_FILES for p in path.rglob("*"))):
        single = path.is_file() or "*" in dataset
        files = [path] if single else sorted(p for p in path.rglob("*") if p.suffix in DATA_FILES)
        kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
        groups = _by_split(files, path.parent if single else path)
        loaded = datasets.load_dataset(kind, data_files=groups, cache_dir=cache_dir)
    elif path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    elif path.exists() or dataset.startswith((".", "/")):
        raise DataError(f"{dataset}: not a saved dataset, parquet/arrow files or an image folder.")
    else:
        try:
            loaded = datasets.load_dataset(dataset, config, revision=revision, cache_dir=cache_dir)
        except (FileNotFoundError, ConnectionError, ValueError) as e:
            raise DataError(f"Hugging Face dataset {dataset!r}: {e}") from e
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _by_split(files: list[Path], root: Path) -> dict[str, list[str]]:
    """Data files grouped by the split their path below ``root`` names, as the Hub lays them out: a folder
    named for it (``test/x.arrow``) or a name starting with it (``train-00000-of-00002.parquet``); else train."""
    names = [name for candidates in SPLIT_NAMES.values() for name in candidates]
    groups: dict[str, list[str]] = {}
    for file in files:
        relative = file.relative_to(root) if file.is_relative_to(root) else Path(file.name)
        folders = [part.lower() for part in relative.parts[:-1]]
        split = next((name for name in names if name in folders), None) or next(
            (name for name in names if re.match(rf"{name}[-_.]", relative.name.lower())), "train"
        )
        groups.setdefault(split, []).append(str(file))
    return groups


def read_hf(
    dataset: str, image_column: str = "image", label_column: str = "label", *, config: str | None = None,
    splits: dict[str, str] | None = None, revision: str | None = None, cache_dir: str | None = None,
) -> SourceSplits:  # fmt: skip
    """A Hugging Face dataset's splits as :class:`Samples` (images read lazily, undecoded until used).

    Splits: ``splits`` maps ours (train, val, test) to the dataset's; by default train, the first of
    validation/valid/val/dev, and test, where the dataset has them. Labels: a ``ClassLabel`` (its
    names), a sequence of ``ClassLabel`` (multi-label), or strings/integers (sorted).

    Raises:
        DataError: a missing column or split, unlabelled rows (``-1``: leave that split out with ``splits``).
    """
    loaded = load_hf(dataset, config, revision, cache_dir)
    names = dict(splits or {})
    unknown = sorted(set(names) - set(SPLITS))
    if unknown:
        raise DataError(f"splits: {', '.join(unknown)} are not ours; map train, val and test to the dataset's.")
    if not names:
        for ours, candidates in SPLIT_NAMES.items():
            found = next((t for t in candidates if t in loaded), None)
            if found:
                names[ours] = found
    missing = [f"{ours}={theirs}" for ours, theirs in names.items() if theirs not in loaded]
    if missing or "train" not in names:
        raise DataError(
            f"{dataset}: no split {', '.join(missing) or 'train'}; its splits are {', '.join(loaded)} "
            "(map ours with splits: {train: ..., val: ..., test: ...})."
        )
    first = loaded[names["train"]]
    columns = list(first.features)
    for what, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in columns:
            raise DataError(f"{dataset}: no column {column!r} ({what}); its columns are {', '.join(columns)}.")
    class_names, multilabel, encoded = _classes(loaded, names, label_column)
    out = {}
    for ours, theirs in names.items():
        part = loaded[theirs]
        where = f"{dataset} [{theirs}] column {label_column!r}"
        labels = _labels(part[label_column], class_names, multilabel, encoded, where)
        rows = np.arange(len(part), dtype=np.int64)
        out[ours] = Samples(HFImages(part, image_column, rows), labels, [f"{theirs}:{i}" for i in rows])
    return SourceSplits(class_names, out)


def _classes(loaded: Any, names: dict[str, str], column: str) -> tuple[list[str], bool, bool]:
    """The class names, whether the column holds several classes per row, and whether its values are
    already class indices (a ``ClassLabel``)."""
    from datasets import ClassLabel, Sequence

    feature = loaded[names["train"]].features[column]
    inner = getattr(feature, "feature", None) if isinstance(feature, (Sequence, list)) else None
    if isinstance(feature, list):
        inner = feature[0]
    if isinstance(feature, ClassLabel):
        return list(feature.names), False, True
    if isinstance(inner, ClassLabel):
        return list(inner.names), True, True
    multilabel = inner is not None
    values: set[Any] = set()
    for theirs in names.values():
        for value in loaded[theirs][column]:
            values.update(value if multilabel else [value])
    values.discard(None)
    if -1 in values and all(isinstance(v, int) for v in values):
        values.discard(-1)
    return [str(v) for v in sorted(values)], multilabel, False


def _labels(values: list[Any], class_names: list[str], multilabel: bool, encoded: bool, where: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names)}

    def one(value: Any) -> int:
        if value is None or (isinstance(value, (int, np.integer)) and value < 0):
            raise DataError(f"{where}: unlabelled rows (None or -1); leave that split out (splits: {{...}}).")
        if encoded:
            if value >= len(class_names):
                raise DataError(f"{where}: label {value} is outside the {len(class_names)} classes.")
            return int(value)
        if str(value) not in index:
            raise DataError(f"{where}: label {value!r} is not among the training split's classes.")
        return index[str(value)]

    if not multilabel:
        return np.array([one(v) for v in values], dtype=np.int64)
    out = np.zeros((len(values), len(class_names)), dtype=np.uint8)
    for row, value in enumerate(values):
        out[row, [one(v) for v in value or []]] = 1
    return out
