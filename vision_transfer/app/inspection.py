"""``vision-transfer inspect``: likely label errors, near-duplicates (leaks across splits) and outliers of a
dataset, from one backbone pass (the feature cache), written as CSV files a person can act on."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.app.protocols import extract_datamodule, extraction_settings, require_single_label, split_arrays
from vision_transfer.data.images import load_image
from vision_transfer.data.sources import Samples
from vision_transfer.datamodules import ImageDataModule
from vision_transfer.evaluation.inspection import label_issues, near_duplicates, out_of_fold_probabilities, outliers

# Cosine similarity of the features above which two images are reported as near-duplicates. Not yet
# calibrated on planted pairs (resized, re-encoded, shifted, flipped copies): the report says so.
DUPLICATE_THRESHOLD = 0.95


def inspect_datamodule(
    datamodule: ImageDataModule,
    backbone: str,
    weights: str | None,
    output: str | Path,
    *,
    folds: int = 5,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    outlier_fraction: float = 0.01,
    outlier_k: int = 10,
    **extract_options: Any,
) -> dict[str, Any]:
    """Run the three detectors on ``datamodule``'s splits and write into ``output``: ``label_issues.csv``,
    ``duplicates.csv``, ``outliers.csv``, their galleries (``label_issues.png``, ``duplicates.png``), a PCA map
    with the flagged samples marked (``map.png``), the features (``embeddings.npy`` + ``embeddings.csv``), for
    file data ``cleaned.csv`` (the flagged rows dropped) and ``inspection.json``; returns the summary."""
    require_single_label(datamodule, "inspect")  # cleanlab's multi-label path: not wired yet
    caches, passes = extract_datamodule(datamodule, backbone, weights, **extract_options)
    arrays = split_arrays(caches, datamodule)
    splits = datamodule.splits
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder leaves nothing of the last one (a gallery it did not draw)
        (folder / name).unlink(missing_ok=True)
    names = datamodule.class_names
    # label issues over train + val together (K folds: no sample scored by a head that saw it)
    pooled = [s for s in ("train", "val") if s in arrays]
    features = np.concatenate([arrays[s][0] for s in pooled]).astype(np.float64)
    labels = np.concatenate([arrays[s][1] for s in pooled])
    where = [(s, i) for s in pooled for i in range(len(arrays[s][1]))]
    oof = out_of_fold_probabilities(features, labels, len(names), folds=folds)
    issues = label_issues(labels, oof.probabilities)
    with (folder / "label_issues.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "id", "given", "suggested", "label_quality"])
        for i in issues.indices:
            split, row = where[i]
            writer.writerow([split, splits[split].ids[row], names[labels[i]], names[issues.suggested[i]],
                             f"{issues.quality[i]:.4f}"])  # fmt: skip
    pairs: list[tuple[str, str, str, str, float]] = []
    for query in ("val", "test", "train"):
        if query not in arrays or "train" not in arrays:
            continue
        found = near_duplicates(
            [arrays[query][0]], None if query == "train" else [arrays["train"][0]], threshold=duplicate_threshold
        )
        pairs += [
            (query, splits[query].ids[q], "train", splits["train"].ids[m], float(s))
            for q, m, s in zip(found.query, found.match, found.similarity, strict=True)
        ]
    digest = _content_digests(splits, {s for p in pairs for s in (p[0], p[2])})
    with (folder / "duplicates.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "id", "duplicate_split", "duplicate_id", "cosine_similarity", "identical_content"])
        writer.writerows(
            [a, b, c, d, f"{s:.4f}", digest.get((a, b)) is not None and digest.get((a, b)) == digest.get((c, d))]
            for a, b, c, d, s in pairs
        )
    isolated = outliers([arrays["train"][0]], k=outlier_k, fraction=outlier_fraction)
    with (folder / "outliers.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "id", "label", "mean_cosine_distance"])
        for i in isolated.indices:
            writer.writerow(
                ["train", splits["train"].ids[i], names[arrays["train"][1][i]], f"{isolated.scores[i]:.4f}"]
            )
    leaks = sum(1 for p in pairs if p[0] != "train")
    _galleries(folder, splits, names, [(where[i], labels[i], issues.suggested[i], issues.quality[i])
                                       for i in issues.indices[:GALLERY]], pairs)  # fmt: skip
    _embeddings(folder, arrays, splits)
    flagged_rows = {
        "label issue": [_row_of(arrays, *where[i]) for i in issues.indices],
        "duplicate": [_row_of(arrays, "train", splits["train"].ids.index(p[3])) for p in pairs],
        "outlier": [_row_of(arrays, "train", int(i)) for i in isolated.indices],
    }
    _map(folder, arrays, names, flagged_rows)
    _cleaned_csv(folder, splits, names, {where[i] for i in issues.indices}, pairs)
    summary = {
        "samples": {s: len(a[1]) for s, a in arrays.items()},
        "label_issues": len(issues.indices),
        "label_issue_folds": folds,
        "probe_c": oof.c,
        "out_of_fold_accuracy": float((oof.probabilities.argmax(1) == labels).mean()),
        "duplicates_within_train": len(pairs) - leaks,
        "duplicates_across_splits": leaks,
        "duplicate_threshold": duplicate_threshold,
        "duplicate_threshold_note": "not yet calibrated on planted pairs",
        "outliers": len(isolated.indices),
        "backbone_passes": passes,
        "files": [name for name in OUTPUTS if (folder / name).exists()],
        "settings": {"backbone": backbone, **extraction_settings(backbone, weights, **extract_options)},
    }
    (folder / "inspection.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


GALLERY = 24  # images per gallery
OUTPUTS = (
    "label_issues.csv", "duplicates.csv", "outliers.csv", "label_issues.png", "duplicates.png", "map.png",
    "embeddings.npy", "embeddings.csv", "cleaned.csv", "inspection.json",
)  # fmt: skip


def _row_of(arrays: dict[str, tuple[np.ndarray, np.ndarray]], split: str, row: int) -> int:
    """A split's row as a row of all splits stacked in ``arrays``' order (the embeddings' order)."""
    offset = 0
    for name, (features, _) in arrays.items():
        if name == split:
            return offset + row
        offset += len(features)
    raise KeyError(split)


def _image(samples: Samples, row: int) -> np.ndarray:
    item = samples.items[row]
    return np.asarray(item) if isinstance(samples.items, np.ndarray) else load_image(str(item))


def _content_digests(splits: dict[str, Samples], names: set[str]) -> dict[tuple[str, str], str]:
    """A content hash of every sample of the named splits: the file's bytes, or the array's."""
    out = {}
    for split in names:
        samples = splits[split]
        for row, sample_id in enumerate(samples.ids):
            item = samples.items[row]
            data = (
                np.ascontiguousarray(item).tobytes()
                if isinstance(samples.items, np.ndarray)
                else Path(str(item)).read_bytes()
            )
            out[(split, sample_id)] = hashlib.sha256(data).hexdigest()
    return out


def _galleries(
    folder: Path, splits: dict[str, Samples], names: list[str], issues: list[tuple[tuple[str, int], int, int, float]],
    pairs: list[tuple[str, str, str, str, float]],
) -> None:  # fmt: skip
    from vision_transfer.report.plots import plot_image_grid

    """``label_issues.png`` and ``duplicates.png``, each only when something was flagged."""
    images = [_image(splits[split], row) for (split, row), _, _, _ in issues]
    titles = [f"{names[given]} -> {names[suggested]}\n{quality:.2f}" for _, given, suggested, quality in issues]
    if images:
        plot_image_grid(images, titles, folder / "label_issues.png", columns=8)
    shown = sorted(pairs, key=lambda p: (p[0] == "train", -p[4]))[: GALLERY // 2]  # leaks first
    images, titles = [], []
    for a, a_id, b, b_id, similarity in shown:
        images += [_image(splits[a], splits[a].ids.index(a_id)), _image(splits[b], splits[b].ids.index(b_id))]
        titles += [f"{a} {Path(a_id).name}", f"{b} {similarity:.3f}"]
    if images:
        plot_image_grid(images, titles, folder / "duplicates.png", columns=8)


def _embeddings(folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], splits: dict[str, Samples]) -> None:
    """Every sample's features (``embeddings.npy``, rows in ``embeddings.csv``'s order), for retrieval."""
    np.save(folder / "embeddings.npy", np.concatenate([features for features, _ in arrays.values()]))
    with (folder / "embeddings.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "split", "id", "label"])
        row = 0
        for split, (_, labels) in arrays.items():
            for sample_id, label in zip(splits[split].ids, labels, strict=True):
                writer.writerow([row, split, sample_id, int(label)])
                row += 1


def _map(
    folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], marks: dict[str, list[int]]
) -> None:
    """A PCA map of every sample, coloured by (given) class, the flagged ones marked."""
    import torch

    from vision_transfer.report.plots import plot_embedding_map

    features = torch.from_numpy(np.concatenate([f for f, _ in arrays.values()]).astype(np.float32))
    _, _, v = torch.pca_lowrank(features, q=2, center=True, niter=4)
    points = ((features - features.mean(0)) @ v[:, :2]).numpy()
    labels = np.concatenate([label for _, label in arrays.values()])
    plot_embedding_map(points, labels, names, {k: np.array(sorted(set(v)), dtype=np.int64) for k, v in marks.items()},
                       folder / "map.png")  # fmt: skip


def _cleaned_csv(
    folder: Path, splits: dict[str, Samples], names: list[str], issues: set[tuple[str, int]],
    pairs: list[tuple[str, str, str, str, float]],
) -> bool:  # fmt: skip
    """``cleaned.csv`` (path, label, split) without the flagged label issues and the train copies of val/test
    images, for data read from files (what ``--data CsvDataModule`` reads back); False for array data."""
    if any(isinstance(s.items, np.ndarray) for s in splits.values()):
        return False
    leaked = {(b, b_id) for a, _, b, b_id, _ in pairs if a != "train"}
    with (folder / "cleaned.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split, samples in splits.items():
            for row, (item, label) in enumerate(zip(samples.items, samples.labels, strict=True)):
                if (split, row) in issues or (split, samples.ids[row]) in leaked:
                    continue
                writer.writerow([str(Path(str(item)).resolve()), names[int(label)], split])
    return True
