"""Read image folders, CSVs and Fashion-MNIST into labelled sample lists, and split them."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from vision_transfer.data.images import IMAGE_SUFFIXES, Decode, check_image_header, load_image
from vision_transfer.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


class EncodedImages(Protocol):
    """Encoded image files held in a dataset rather than on disk (Hugging Face records, litdata chunks)."""

    def __len__(self) -> int: ...
    def encoded(self, row: int) -> bytes:
        """The file's bytes (JPEG, PNG, ...) of a row."""
        ...

    def take(self, index: np.ndarray) -> EncodedImages:
        """The rows ``index``, in that order."""
        ...

    def fingerprint(self) -> str:
        """What identifies the content: the dataset's own fingerprint and the rows taken."""
        ...


@dataclass
class Samples:
    """Labelled images: ``items`` are file paths, an ``N x H x W[x C]`` uint8 array, or encoded files
    held in a dataset (:class:`EncodedImages`). Only this class asks which: the rest of the toolkit
    reads a sample through :meth:`image`, :meth:`content` and :meth:`name`.

    ``labels`` are int64 class indices (``-1`` when unknown), or for multi-label data an
    ``N x num_classes`` uint8 matrix of 0/1.
    """

    items: list[str] | np.ndarray | EncodedImages
    labels: np.ndarray
    ids: list[str]  # stable, human-readable identity of each sample (path or "train:123")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        """Decoded pixels in an array (no files, nothing to decode)."""
        return isinstance(self.items, np.ndarray)

    @property
    def files(self) -> list[str] | None:
        """The image files, when the samples are files on disk."""
        return self.items if isinstance(self.items, list) else None

    def name(self, row: int) -> str:
        """The sample as messages name it: its file, else its id."""
        return self.items[row] if isinstance(self.items, list) else self.ids[row]

    def image(self, row: int, *, min_side: int | None = None, decode: Decode = "full") -> np.ndarray:
        """The row's image as HxWx3 uint8 RGB (see :func:`~vision_transfer.data.images.load_image`).

        Raises:
            ImageLoadError: the file or record does not decode; it names the sample.
        """
        items = self.items
        if isinstance(items, np.ndarray):
            item = items[row]
            return np.repeat(item[..., None], 3, axis=2) if item.ndim == 2 else item
        if isinstance(items, list):
            return load_image(items[row], min_side=min_side, decode=decode)
        return load_image(self.ids[row], min_side=min_side, decode=decode, data=items.encoded(row))

    def check_header(self, row: int) -> None:
        """Open the row's image header (files and records; arrays are decoded already)."""
        if isinstance(self.items, list):
            check_image_header(self.items[row])
        elif not isinstance(self.items, np.ndarray):
            check_image_header(self.ids[row], data=self.items.encoded(row))

    def content(self, row: int) -> bytes:
        """The row's bytes as stored: the file's, the record's, or the array's pixels."""
        items = self.items
        if isinstance(items, np.ndarray):
            return np.ascontiguousarray(items[row]).tobytes()
        if isinstance(items, list):
            return Path(items[row]).read_bytes()
        return items.encoded(row)

    def fingerprint(self) -> str:
        """Hash of what the images are: ids and, for files, size and mtime; for arrays, the bytes; for
        records, their dataset's fingerprint. Labels are left out: they do not change the images."""
        digest = hashlib.sha256()
        digest.update(json.dumps(list(self.ids), separators=(",", ":")).encode())
        items = self.items
        if isinstance(items, np.ndarray):
            digest.update(np.ascontiguousarray(items).tobytes())
        elif isinstance(items, list):
            for path in items:
                stat = os.stat(path)
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
        else:
            digest.update(items.fingerprint().encode())
        return digest.hexdigest()

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Samples (single-label) or positives (multi-label) of each class."""
        if self.multilabel:
            return self.labels.sum(axis=0).astype(np.int64)
        return np.bincount(self.labels[self.labels >= 0], minlength=num_classes).astype(np.int64)

    def take(self, index: np.ndarray) -> Samples:
        items = self.items
        taken = (
            items[index] if isinstance(items, np.ndarray)
            else [items[i] for i in index] if isinstance(items, list)
            else items.take(np.asarray(index, dtype=np.int64))
        )  # fmt: skip
        return Samples(taken, self.labels[index], [self.ids[i] for i in index])


@dataclass
class SourceSplits:
    """What a source provides: class names and any of the train/val/test splits it defines."""

    class_names: list[str]
    splits: dict[str, Samples]

    @property
    def task(self) -> str:
        return "multilabel" if self.splits["train"].multilabel else "multiclass"


def stratification_key(labels: np.ndarray) -> np.ndarray:
    """One class per sample to stratify on: the label itself, or for multi-label rows the rarest
    class present (``num_classes`` for a row without any), a common stand-in for iterative stratification."""
    if labels.ndim == 1:
        return labels
    frequency = labels.sum(axis=0).astype(np.float64)
    rarity = np.where(labels > 0, frequency[None, :], np.inf)
    return np.where(labels.any(axis=1), rarity.argmin(axis=1), labels.shape[1])


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into ``len(fractions) + 1`` parts, each class shared out by the fractions.

    Every class with at least ``len(fractions) + 1`` samples puts one or more in each part; the
    remainder (the first part, train) gets what the fractions leave, and always keeps at least one
    sample of every class.

    Raises:
        ConfigError: the fractions are negative or add up to 1 or more.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(f"split fractions {list(fractions)}: each must be >= 0 and together < 1.")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = len(idx)
        for part, fraction in zip(parts[1:], fractions, strict=True):
            n = round(len(idx) * fraction)
            if fraction > 0 and n == 0 and len(idx) > len(fractions):
                n = 1
            n = max(0, min(n, start - 1))  # the remainder keeps one sample of the class
            part.extend(idx[start - n : start])
            start -= n
        parts[0].extend(idx[:start])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-balanced random subset of exactly ``size`` samples (all when fewer).

    With ``size`` at least the number of classes, every class gets one sample and the rest is shared
    in proportion to the class sizes (largest remainders first). With fewer, a seeded random choice
    of ``size`` classes gets one sample each: the subset cannot cover every class.
    """
    if size < 0:
        raise DataError(f"subset size {size}: must be 0 or more.")
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if size < len(classes):
        take = np.zeros(len(classes), dtype=np.int64)
        take[rng.choice(len(classes), size, replace=False)] = 1
    else:
        # One each, then the other size - k shared by the remaining counts; a share never exceeds
        # its class's remaining count because size - k < len(labels) - k.
        share = (counts - 1) * (size - len(classes)) / (len(labels) - len(classes))
        take = 1 + np.floor(share).astype(np.int64)
        left = size - int(take.sum())
        # Largest fractional parts first, ties in a seeded random order.
        order = np.lexsort((rng.random(len(classes)), -(share - np.floor(share))))
        take[order[:left]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_id(path: Path, root: Path) -> str:
    """A file's identity in a dataset: its path relative to the dataset's root folder, POSIX-style,
    however the root or the path was written (``labels.csv`` or ``/abs/labels.csv``, ``a/../b.png``);
    absolute only for files outside the root. Moving the whole dataset keeps the ids."""
    resolved, base = path.resolve(), root.resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else resolved.as_posix()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected one folder of images per class).")
    per_class = {f.name: _images_in(f) for f in folders}
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty)}.")
    return per_class


def read_image_folder(root: str | Path) -> SourceSplits:
    """One sub-folder per class, or ``train/``, ``val/``, ``test/`` each holding class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in layout:
        layout = {"": root}
    per_split = {split or "train": _class_folders(folder) for split, folder in layout.items()}
    class_names = sorted(per_split["train"])
    splits = {}
    for split, per_class in per_split.items():
        unknown = sorted(set(per_class) - set(class_names))
        if unknown:
            raise DataError(f"{root / split}: classes not in train/: {', '.join(unknown)}.")
        files = [(f, class_names.index(c)) for c, fs in per_class.items() for f in fs]
        splits[split] = Samples(
            [str(f) for f, _ in files],
            np.array([c for _, c in files], dtype=np.int64),
            [sample_id(f, root) for f, _ in files],
        )
    return SourceSplits(class_names, splits)


def read_csv(
    path: str | Path,
    path_column: str = "path",
    label_column: str = "label",
    *,
    labels_column: str = "labels",
    label_separator: str = ";",
    label_columns: list[str] | None = None,
    task: Literal["auto", "multiclass", "multilabel"] = "auto",
) -> SourceSplits:
    """Image rows of a CSV, paths relative to the CSV; an optional ``split`` column assigns splits.

    Single-label: one class name per row in ``label_column``. Multi-label: several class names
    in ``labels_column``, separated by ``label_separator`` (an empty cell: no class present), or one
    0/1 column per class (``label_columns``). ``task`` ``auto`` reads a ``labels_column`` as
    multi-label when the CSV has no ``label_column``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    multilabel = task == "multilabel" or bool(label_columns)
    if task == "auto" and label_column not in columns and labels_column in columns:
        multilabel = True
    needed = [path_column, *(label_columns or [labels_column] if multilabel else [label_column])]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}.")
    if not rows:
        raise DataError(f"{path}: no data rows (only a header).")
    bad_split = sorted({r["split"] for r in rows if r.get("split") and r["split"] not in SPLITS})
    if bad_split:
        raise DataError(f"{path}: unknown split value(s) {', '.join(bad_split)}; use {', '.join(SPLITS)}.")
    files = [path.parent / r[path_column] for r in rows]
    ids = [sample_id(f, path.parent) for f in files]
    absent = [f"line {i + 2}: {f}" for i, f in enumerate(files) if not f.is_file()]
    if absent:
        more = f" (and {len(absent) - 5} more)" if len(absent) > 5 else ""
        raise DataError(f"{path}: image file(s) not found: {'; '.join(absent[:5])}{more}.")
    if multilabel:
        class_names, labels = _multilabel_rows(path, rows, labels_column, label_separator, label_columns)
    else:
        empty = [f"line {i + 2}" for i, r in enumerate(rows) if not (r[label_column] or "").strip()]
        if empty:
            raise DataError(
                f"{path}: empty {label_column!r} on {', '.join(empty[:5])}; a single-label dataset needs a class on "
                f"every row (for images with several or no classes, use a {labels_column!r} column: multi-label)."
            )
        class_names = sorted({r[label_column] for r in rows})
        labels = np.array([class_names.index(r[label_column]) for r in rows], dtype=np.int64)
    split_of = np.array([r.get("split") or "train" for r in rows])
    splits = {}
    for split in SPLITS:
        index = np.flatnonzero(split_of == split)
        if len(index):
            splits[split] = Samples([str(files[i]) for i in index], labels[index], [ids[i] for i in index])
    if "train" not in splits:
        raise DataError(f"{path}: no rows in the train split.")
    return SourceSplits(class_names, splits)


def _multilabel_rows(
    path: Path, rows: list[dict[str, str]], labels_column: str, separator: str, label_columns: list[str] | None
) -> tuple[list[str], np.ndarray]:
    if label_columns:
        labels = np.zeros((len(rows), len(label_columns)), dtype=np.uint8)
        for i, row in enumerate(rows):
            for c, name in enumerate(label_columns):
                value = (row[name] or "0").strip()
                if value not in ("0", "1"):
                    raise DataError(f"{path}: line {i + 2}, column {name!r}: {value!r} is not 0 or 1.")
                labels[i, c] = value == "1"
        return list(label_columns), labels
    sets = [{n.strip() for n in (row[labels_column] or "").split(separator) if n.strip()} for row in rows]
    class_names = sorted(set().union(*sets))
    if not class_names:
        raise DataError(f"{path}: no class names in column {labels_column!r} (separator {separator!r}).")
    index = {name: c for c, name in enumerate(class_names)}
    labels = np.zeros((len(rows), len(class_names)), dtype=np.uint8)
    for i, names in enumerate(sets):
        labels[i, [index[n] for n in names]] = 1
    return class_names, labels


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {"train": "train-{}-idx{}-ubyte", "test": "t10k-{}-idx{}-ubyte"}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path}: not an IDX file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({array.size} of {int(np.prod(shape))} values).")
    return array.reshape(shape)


def read_sklearn_digits() -> SourceSplits:
    """scikit-learn's digits: 1,797 real 8x8 handwritten digits (0-16 grey levels), 10 classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    samples = Samples(images, labels, [f"digits:{i}" for i in range(len(labels))])
    return SourceSplits([str(d) for d in range(10)], {"train": samples})


def _find_idx(root: Path, split: str, kind: str) -> Path | None:
    stem = _FASHION_FILES[split].format(kind, 3 if kind == "images" else 1)
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def read_fashion_mnist(root: str | Path | None = None, download: bool = False) -> SourceSplits:
    """Fashion-MNIST's IDX files from ``root``, the Debian package, or torchvision's download."""
    candidates = [Path(root)] if root else [FASHION_MNIST_DEBIAN_ROOT]
    found = next((r for r in candidates if _find_idx(r, "train", "images")), None)
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        target = Path(root) if root else Path.home() / ".cache" / "vision_transfer" / "fashion_mnist"
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
        found = target
    if found is None:
        where = root or FASHION_MNIST_DEBIAN_ROOT
        raise DataError(
            f"Fashion-MNIST IDX files not found in {where}: `apt-get install dataset-fashion-mnist`, "
            "give root=<folder with train-images-idx3-ubyte[.gz]>, or set download=true when online."
        )
    splits = {}
    for split in ("train", "test"):
        images_path, labels_path = _find_idx(found, split, "images"), _find_idx(found, split, "labels")
        if images_path is None or labels_path is None:
            raise DataError(f"{found}: the {split} images or labels IDX file is missing.")
        images, labels = _read_idx(images_path), _read_idx(labels_path).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{found}: {split} has {len(images)} images but {len(labels)} labels.")
        splits[split] = Samples(images, labels, [f"{split}:{i}" for i in range(len(labels))])
    return SourceSplits(list(FASHION_MNIST_CLASSES), splits)
