"""Scan a dataset before training: counts, sizes, modes, unreadable files, duplicates."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vision_transfer.data.images import load_image
from vision_transfer.data.prepared import METADATA
from vision_transfer.data.sources import SourceSplits, read_csv, read_fashion_mnist, read_image_folder
from vision_transfer.errors import DataError, ImageLoadError

IMBALANCE_WARNING = 10.0  # largest / smallest class; above it, accuracy mostly measures the large classes


@dataclass
class DataReport:
    """What :func:`check_source` found."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    modes: Counter[str] = field(default_factory=Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (first seen, duplicate), "split:path"
    multilabel: bool = False

    @property
    def imbalance_ratio(self) -> float:
        """Largest over smallest class in train (multi-label: positives); inf when a class has none."""
        counts = [n for n in self.counts.get("train", Counter()).values()]
        if not counts:
            return 1.0
        return max(counts) / min(counts) if min(counts) > 0 else float("inf")

    @property
    def cross_split_duplicates(self) -> list[tuple[str, str]]:
        return [(a, b) for a, b in self.duplicates if a.split(":", 1)[0] != b.split(":", 1)[0]]

    def format(self) -> str:
        classes = sorted({c for counter in self.counts.values() for c in counter})
        splits = list(self.counts)
        lines = ["| class | " + " | ".join(splits) + " |", "|" + " --- |" * (len(splits) + 1)]
        lines += [f"| {c} | " + " | ".join(str(self.counts[s][c]) for s in splits) + " |" for c in classes]
        lines.append("| total | " + " | ".join(str(sum(self.counts[s].values())) for s in splits) + " |")
        if self.widths:
            w, h = np.array(self.widths), np.array(self.heights)
            lines.append(
                f"\nimage sizes (w x h): min {w.min()}x{h.min()}, median {int(np.median(w))}x{int(np.median(h))}, "
                f"max {w.max()}x{h.max()}; modes: {', '.join(f'{m} {n}' for m, n in self.modes.most_common())}"
            )
        ratio = self.imbalance_ratio
        lines.append(f"imbalance ratio (largest / smallest class in train): {ratio:.1f}")
        if ratio > IMBALANCE_WARNING:
            lines.append(
                f"  warning: imbalance above {IMBALANCE_WARNING:g}. Consider --data.init_args.balanced_sampling true, "
                "--model.logit_adjustment loss (or posthoc), --model.class_weighting balanced or "
                "--model.focal_gamma 2, and read balanced accuracy (val/balanced_acc), not only accuracy."
            )
        lines.append(f"unreadable files: {len(self.unreadable)}")
        lines += [f"  {path}: {reason}" for path, reason in self.unreadable[:20]]
        cross = self.cross_split_duplicates
        lines.append(f"duplicate files: {len(self.duplicates)} ({len(cross)} across splits, which leaks test data)")
        lines += [f"  {b} duplicates {a}" for a, b in (cross or self.duplicates)[:20]]
        return "\n".join(lines)


def check_source(source: SourceSplits, decode: bool = True) -> DataReport:
    """Open every image (fully when ``decode``), count classes per split, find byte-identical files."""
    report = DataReport()
    seen: dict[str, str] = {}
    for split, samples in source.splits.items():
        counts = samples.class_counts(len(source.class_names))
        report.counts[split] = Counter({name: int(n) for name, n in zip(source.class_names, counts, strict=True)})
        report.multilabel = samples.multilabel
        if samples.in_memory:
            items = np.asarray(samples.items)
            report.modes["L" if items.ndim == 3 else "RGB"] += len(items)
            report.heights += [items.shape[1]] * len(items)
            report.widths += [items.shape[2]] * len(items)
            continue
        for row in range(len(samples)):
            name = samples.name(row)
            try:
                data = samples.content(row)
            except OSError as e:
                report.unreadable.append((name, str(e)))
                continue
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest in seen:
                report.duplicates.append((seen[digest], f"{split}:{name}"))
            else:
                seen[digest] = f"{split}:{name}"
            try:
                with Image.open(io.BytesIO(data)) as image:
                    report.modes[image.mode] += 1
                    report.widths.append(image.width)
                    report.heights.append(image.height)
                if decode:
                    load_image(name, data=data)
            except ImageLoadError as e:
                report.unreadable.append((name, e.reason))
            except (OSError, SyntaxError, ValueError) as e:  # the header alone, opened by PIL above
                report.unreadable.append((name, str(e)))
    return report


def read_any(source: str) -> SourceSplits:
    """A folder, a ``.csv`` file, ``fashion-mnist`` (Debian package or a folder after a colon), a prepared
    dataset (``vision-transfer prepare``'s folder), or ``hf:`` and a Hugging Face dataset's name or path."""
    if source == "fashion-mnist" or source.startswith("fashion-mnist:"):
        return read_fashion_mnist(source.partition(":")[2] or None)
    if source.startswith("hf:"):
        from vision_transfer.data.hf import read_hf

        return read_hf(source.removeprefix("hf:"))
    path = Path(source)
    if path.suffix == ".csv":
        return read_csv(path)
    if (path / METADATA).is_file():
        from vision_transfer.data.prepared import read_prepared

        return read_prepared(source)[0]
    if path.is_dir():
        return read_image_folder(path)
    raise DataError(f"{source}: not a folder, a .csv file, a prepared dataset, 'fashion-mnist' or 'hf:<dataset>'.")
