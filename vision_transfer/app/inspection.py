"""``vision-transfer inspect``: likely label errors, near-duplicates (leaks across splits) and outliers of a
dataset, from one backbone pass (the feature cache), written as CSV files a person can act on."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.app.protocols import extract_datamodule, extraction_settings, split_arrays
from vision_transfer.data.sources import Samples
from vision_transfer.datamodules import ImageDataModule
from vision_transfer.evaluation.inspection import label_issues, near_duplicates, out_of_fold_probabilities, outliers
from vision_transfer.evaluation.kinds import kind_of_labels

# Cosine similarity of the features above which two images are reported as near-duplicates. Calibrated by
# benchmarks/inspect_data.py (packaged lite0 at 64 px, Fashion-MNIST, 50 exact + 50 near copies of test images
# planted in train, 3 seeds): at 0.95 every exact copy is found and 78% of the reported leaks are planted ones,
# but only 26% of the near copies (resized, JPEG 60, 1-pixel shift, mirrored) clear it; 0.80 finds 75% of them
# at 6% precision. Fashion-MNIST's natural nearest neighbours are as close as its near copies (99th percentile
# 0.948), so no threshold of these features separates them there: the summary says so.
DUPLICATE_THRESHOLD = 0.95
DUPLICATE_NOTE = (
    "0.95: exact copies always found; near copies (resized, re-encoded, shifted) only partly, calibrated on "
    "Fashion-MNIST (see README): review duplicates.png, lower --duplicate_threshold to catch more"
)


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
    file data ``cleaned.csv`` (the flagged rows dropped) and ``inspection.json``; returns the summary.
    Multi-label data: one-vs-rest out-of-fold probabilities and cleanlab's multi-label ranking; labels are
    written as ``;``-separated class names."""
    caches, passes = extract_datamodule(datamodule, backbone, weights, **extract_options)
    arrays = split_arrays(caches, datamodule)
    splits = datamodule.splits
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder leaves nothing of the last one (a gallery it did not draw)
        (folder / name).unlink(missing_ok=True)
    names = datamodule.class_names

    def named(label: Any) -> str:  # a class name, or a multi-hot row's names joined by ";"
        return ";".join(names[c] for c in np.flatnonzero(label)) if np.ndim(label) else names[int(label)]

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
            writer.writerow([split, splits[split].ids[row], named(labels[i]), named(issues.suggested[i]),
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
                ["train", splits["train"].ids[i], named(arrays["train"][1][i]), f"{isolated.scores[i]:.4f}"]
            )
    leaks = sum(1 for p in pairs if p[0] != "train")
    _galleries(folder, splits, [(where[i], named(labels[i]), named(issues.suggested[i]), issues.quality[i])
                                for i in issues.indices[:GALLERY]], pairs)  # fmt: skip
    _embeddings(folder, arrays, splits, named)
    flagged_rows = {
        "label issue": [_row_of(arrays, *where[i]) for i in issues.indices],
        "duplicate": [_row_of(arrays, "train", splits["train"].ids.index(p[3])) for p in pairs],
        "outlier": [_row_of(arrays, "train", int(i)) for i in isolated.indices],
    }
    _map(folder, arrays, names, flagged_rows)
    kind = kind_of_labels(labels)
    _cleaned_csv(folder, splits, named, {where[i] for i in issues.indices}, pairs, kind.label_column)
    summary = {
        "task": kind.name,
        "samples": {s: len(a[1]) for s, a in arrays.items()},
        "label_issues": len(issues.indices),
        "label_issue_folds": folds,
        "probe_c": oof.c,
        **_out_of_fold_score(oof.probabilities, labels),
        "duplicates_within_train": len(pairs) - leaks,
        "duplicates_across_splits": leaks,
        "duplicate_threshold": duplicate_threshold,
        "duplicate_threshold_note": DUPLICATE_NOTE if duplicate_threshold == DUPLICATE_THRESHOLD else "user-set",
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


SUMMARY_NAMES = {"acc": "accuracy", "map": "map"}  # the kinds' selection metrics, as inspection.json keys them


def _out_of_fold_score(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How well the out-of-fold probe fits the given labels: the task kind's selection metric (accuracy, or
    mAP for multi-hot labels; both depend on the probabilities' order only)."""
    import torch

    kind = kind_of_labels(labels)
    score = kind.selection_scores(torch.from_numpy(probabilities).float(), torch.from_numpy(labels))[kind.metric]
    return {f"out_of_fold_{SUMMARY_NAMES[kind.metric]}": float(score)}


def _row_of(arrays: dict[str, tuple[np.ndarray, np.ndarray]], split: str, row: int) -> int:
    """A split's row as a row of all splits stacked in ``arrays``' order (the embeddings' order)."""
    offset = 0
    for name, (features, _) in arrays.items():
        if name == split:
            return offset + row
        offset += len(features)
    raise KeyError(split)


def _content_digests(splits: dict[str, Samples], names: set[str]) -> dict[tuple[str, str], str]:
    """A content hash of every sample of the named splits: the file's bytes, or the array's."""
    out = {}
    for split in names:
        samples = splits[split]
        for row, sample_id in enumerate(samples.ids):
            out[(split, sample_id)] = hashlib.sha256(samples.content(row)).hexdigest()
    return out


def _galleries(
    folder: Path, splits: dict[str, Samples], issues: list[tuple[tuple[str, int], str, str, float]],
    pairs: list[tuple[str, str, str, str, float]],
) -> None:  # fmt: skip
    """``label_issues.png`` (given -> suggested labels, quality) and ``duplicates.png``, each only when
    something was flagged."""
    from vision_transfer.report.plots import plot_image_grid

    images = [splits[split].image(row) for (split, row), _, _, _ in issues]
    titles = [f"{given} -> {suggested}\n{quality:.2f}" for _, given, suggested, quality in issues]
    if images:
        plot_image_grid(images, titles, folder / "label_issues.png", columns=8)
    shown = sorted(pairs, key=lambda p: (p[0] == "train", -p[4]))[: GALLERY // 2]  # leaks first
    images, titles = [], []
    for a, a_id, b, b_id, similarity in shown:
        images += [splits[a].image(splits[a].ids.index(a_id)), splits[b].image(splits[b].ids.index(b_id))]
        titles += [f"{a} {Path(a_id).name}", f"{b} {similarity:.3f}"]
    if images:
        plot_image_grid(images, titles, folder / "duplicates.png", columns=8)


def _embeddings(
    folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], splits: dict[str, Samples], named: Any
) -> None:
    """Every sample's features (``embeddings.npy``, rows in ``embeddings.csv``'s order, with the class
    name(s)), for retrieval."""
    np.save(folder / "embeddings.npy", np.concatenate([features for features, _ in arrays.values()]))
    with (folder / "embeddings.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "split", "id", "label"])
        row = 0
        for split, (_, labels) in arrays.items():
            for sample_id, label in zip(splits[split].ids, labels, strict=True):
                writer.writerow([row, split, sample_id, named(label)])
                row += 1


def _map(
    folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], marks: dict[str, list[int]]
) -> None:
    """A PCA map of every sample, coloured by (given) class (multi-label: its first class), the flagged ones
    marked."""
    import torch

    from vision_transfer.report.plots import plot_embedding_map

    features = torch.from_numpy(np.concatenate([f for f, _ in arrays.values()]).astype(np.float32))
    _, _, v = torch.pca_lowrank(features, q=2, center=True, niter=4)
    points = ((features - features.mean(0)) @ v[:, :2]).numpy()
    labels = np.concatenate([label for _, label in arrays.values()])
    if labels.ndim == 2:
        labels = labels.argmax(1)
    plot_embedding_map(points, labels, names, {k: np.array(sorted(set(v)), dtype=np.int64) for k, v in marks.items()},
                       folder / "map.png")  # fmt: skip


def _cleaned_csv(
    folder: Path, splits: dict[str, Samples], named: Any, issues: set[tuple[str, int]],
    pairs: list[tuple[str, str, str, str, float]], label_column: str = "label",
) -> bool:  # fmt: skip
    """``cleaned.csv`` (path, label or ``;``-separated labels, split) without the flagged label issues and the
    train copies of val/test images, for data read from files (what ``--data CsvDataModule`` reads back);
    False for array data."""
    files = {split: s.files for split, s in splits.items()}
    if any(paths is None for paths in files.values()):
        return False
    leaked = {(b, b_id) for a, _, b, b_id, _ in pairs if a != "train"}
    with (folder / "cleaned.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", label_column, "split"])
        for split, samples in splits.items():
            for row, (path, label) in enumerate(zip(files[split] or [], samples.labels, strict=True)):
                if (split, row) in issues or (split, samples.ids[row]) in leaked:
                    continue
                writer.writerow([str(Path(path).resolve()), named(label), split])
    return True
