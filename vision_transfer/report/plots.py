"""PNG plots of a run: training curves from ``metrics.csv`` and the confusion matrix."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no backend to select


def read_metrics(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``metrics.csv`` (Lightning's CSVLogger) -> metric name -> [(step, value)]."""
    series: dict[str, list[tuple[float, float]]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_training_curves(metrics_csv: str | Path, out: str | Path) -> Path | None:
    """Loss, accuracy and learning-rate curves against the optimizer step; None if nothing logged."""
    series = read_metrics(metrics_csv)
    panels: list[tuple[str, list[str]]] = [
        ("loss", [k for k in ("train/loss", "val/loss") if k in series]),
        ("accuracy", [k for k in ("train/acc", "val/acc") if k in series]),
        ("learning rate", sorted(k for k in series if k.startswith("lr") and not k.endswith("no_decay"))),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    axes: Any
    if not panels:
        return None
    fig = Figure(figsize=(5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        drawn: list[list[tuple[float, float]]] = []
        for key in keys:
            if series[key] in drawn:  # e.g. stage groups that share one learning rate
                continue
            drawn.append(series[key])
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, marker="o" if key.startswith("val") else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], out: str | Path) -> Path:
    """Row-normalised confusion matrix (true class per row), with counts in the cells."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    size = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7, color=color)
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    ax.set_title(f"confusion matrix (accuracy {accuracy:.2%}, n={int(matrix.sum())})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out


def plot_per_class(class_names: list[str], values: np.ndarray, out: str | Path, metric: str = "recall") -> Path:
    """Horizontal bars of each class's test ``metric`` (recall, or AP for multi-label), worst at the top."""
    order = np.argsort(np.nan_to_num(np.asarray(values, dtype=float), nan=-1.0))
    fig = Figure(figsize=(6, max(2.5, 0.3 * len(class_names) + 1)))
    ax = fig.subplots()
    shown = [float(values[i]) if not math.isnan(values[i]) else 0.0 for i in order]
    ax.barh(range(len(order)), shown, color="tab:blue")
    ax.set_yticks(range(len(order)), [class_names[i] for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel({"recall": "recall (per-class accuracy)", "ap": "average precision"}.get(metric, metric))
    for y, value in enumerate(shown):  # inside long bars, after short ones
        inside = value > 0.8
        x, align, color = (value - 0.01, "right", "white") if inside else (value + 0.01, "left", "black")
        ax.text(x, y, f"{value:.1%}", va="center", ha=align, fontsize=7, color=color)
    ax.set_title(f"per-class {'average precision' if metric == 'ap' else 'recall'} on the test split, lowest first")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out


def plot_image_grid(
    images: list[np.ndarray], titles: list[str], out: str | Path | None = None, columns: int = 8
) -> Any:
    """HWC uint8 images in a grid with a title each; saved to ``out`` (then closed) or returned."""
    rows = max(1, math.ceil(len(images) / columns))
    columns = min(columns, max(1, len(images)))
    fig = Figure(figsize=(1.5 * columns, 1.7 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image.squeeze(), cmap="gray" if image.ndim == 2 or image.shape[-1] == 1 else None)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    if out is None:
        return fig
    fig.savefig(out, dpi=80)
    return Path(out)


def plot_embedding_map(
    points: np.ndarray, labels: np.ndarray, class_names: list[str], marks: dict[str, np.ndarray], out: str | Path
) -> Path:
    """A 2-D map of the samples coloured by class, with each set of ``marks`` (name -> row indices) drawn over it."""
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    cmap = "tab10" if len(class_names) <= 10 else "tab20"
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap=cmap, s=4, alpha=0.5, linewidths=0)
    for (name, rows), style in zip(marks.items(), ("x", "o", "^", "s"), strict=False):
        if len(rows):
            look: dict[str, Any] = {"c": "black"} if style == "x" else {"facecolors": "none", "edgecolors": "black"}
            ax.scatter(points[rows, 0], points[rows, 1], marker=style, s=30, linewidths=0.8,
                       label=f"{name} ({len(rows)})", **look)  # fmt: skip
    handles = scatter.legend_elements(num=len(class_names))[0]
    legend = ax.legend(handles, class_names[: len(handles)], fontsize=7, loc="upper right", title="class")
    ax.add_artist(legend)
    if any(len(rows) for rows in marks.values()):
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return Path(out)


def plot_reliability(before: dict[str, list[float]], after: dict[str, list[float]], out: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
    for data, label, color in ((before, "before", "tab:red"), (after, "after (temperature)", "tab:blue")):
        points = [(c, a) for c, a, n in zip(data["confidence"], data["accuracy"], data["count"], strict=True) if n]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=color, label=label)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability on the validation split (15 bins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out
