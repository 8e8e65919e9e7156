"""A run folder's derived files: plots from its CSVs and ``summary.md`` from ``run.json``.

Everything here reads only files in the run folder, so ``vision-transfer report <run-dir>``
can redraw a run on another machine, without the model or the data.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vision_transfer.errors import VisionTransferError
from vision_transfer.evaluation.metrics import recall_from_confusion
from vision_transfer.report.plots import plot_confusion_matrix, plot_per_class, plot_training_curves

PLOTS = ("curves", "confusion", "per_class")


def update_run_facts(folder: Path, **facts: Any) -> None:
    """Merge ``facts`` into the run folder's ``run.json`` (what ``summary.md`` is made from)."""
    path = folder / "run.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(facts)
    path.write_text(json.dumps(data, indent=2, default=str))


def write_confusion(folder: Path, matrix: np.ndarray, class_names: list[str]) -> None:
    """``confusion_matrix.csv`` (true class per row) and ``per_class.csv``."""
    with (folder / "confusion_matrix.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        writer.writerows([name, *map(int, row)] for name, row in zip(class_names, matrix, strict=True))
    with (folder / "per_class.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "support", "recall"])
        for name, support, recall in zip(class_names, matrix.sum(axis=1), recall_from_confusion(matrix), strict=True):
            writer.writerow([name, int(support), f"{recall:.4f}"])


def write_average_precision(folder: Path, ap: np.ndarray, class_names: list[str], positives: Any) -> None:
    """Multi-label: ``per_class.csv`` with each class's positives and average precision on test."""
    counts = np.asarray(positives if positives is not None else np.zeros(len(class_names)), dtype=np.int64)
    with (folder / "per_class.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "positives", "ap"])
        for name, n, value in zip(class_names, counts, np.atleast_1d(ap), strict=True):
            writer.writerow([name, int(n), f"{float(value):.4f}"])


def read_per_class(folder: Path) -> tuple[list[str], np.ndarray, str] | None:
    """Class names, values and metric (``recall`` or ``ap``) of ``per_class.csv``."""
    path = folder / "per_class.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    metric = "ap" if rows and "ap" in rows[0] else "recall" if rows and "recall" in rows[0] else "accuracy"
    values = np.array([float(r[metric]) if r[metric] not in ("", "nan") else math.nan for r in rows])
    return [r["class"] for r in rows], values, "recall" if metric == "accuracy" else metric


def read_confusion(folder: Path) -> tuple[np.ndarray, list[str]] | None:
    path = folder / "confusion_matrix.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    return np.array([[int(v) for v in row[1:]] for row in rows[1:]]), names


def draw_plots(folder: Path, only: Iterable[str] = PLOTS) -> list[Path]:
    """(Re)draw the PNGs whose source files exist in ``folder``."""
    drawn: list[Path] = []
    only = set(only)
    if "curves" in only and (folder / "metrics.csv").is_file():
        path = plot_training_curves(folder / "metrics.csv", folder / "curves.png")
        drawn += [path] if path else []
    confusion = read_confusion(folder)
    if confusion is not None and "confusion" in only:
        matrix, names = confusion
        drawn.append(plot_confusion_matrix(matrix, names, folder / "confusion_matrix.png"))
    per_class = read_per_class(folder)
    if per_class is not None and "per_class" in only:
        names, values, metric = per_class
        name = "per_class_ap.png" if metric == "ap" else "per_class_accuracy.png"
        drawn.append(plot_per_class(names, values, folder / name, metric))
    return drawn


def _best_val(folder: Path) -> tuple[float, int] | None:
    """Best val/acc and the epoch it was reached, from ``metrics.csv``."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return None
    best: tuple[float, int] | None = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            value = row.get("val/acc")
            if value and (best is None or float(value) > best[0]):
                best = (float(value), int(float(row.get("epoch") or 0)))
    return best


def summary_text(folder: str | Path) -> str:
    """The Markdown summary of one run folder."""
    folder = Path(folder)
    facts: dict[str, Any] = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    if not facts and not (folder / "metrics.csv").is_file():
        raise VisionTransferError(f"{folder}: not a run folder (no run.json or metrics.csv in it).")
    model, data, fit, test = (facts.get(k, {}) for k in ("model", "data", "fit", "test"))
    lines = [f"# Run {folder.name} ({folder.parent.name})", "", "| setting | value |", "| --- | --- |"]
    if model:
        lines.append(f"| backbone | {model.get('backbone')} (initial weights: {model.get('initial_weights')}) |")
        lines.append(f"| mode | {model.get('mode')} |")
        lr = f"lr {model.get('lr')}" + (f", head_lr {model['head_lr']}" if model.get("head_lr") else "")
        lines.append(f"| optimizer | {model.get('optimizer')}, {lr}, layer_decay {model.get('layer_decay')} |")
        lines.append(f"| parameters | {model.get('parameters', 0) / 1e6:.2f} M |")
    if data:
        sizes = ", ".join(f"{k} {v}" for k, v in data.get("samples", {}).items())
        lines.append(f"| data | {data.get('source')}: {data.get('classes')} classes; {sizes} |")
        lines.append(f"| batch size | {data.get('batch_size')} |")
    if fit:
        lines.append(f"| training | {fit.get('epochs')} epochs, {fit.get('steps')} steps, {fit.get('precision')} |")
        minutes, seconds = divmod(float(fit.get("seconds", 0)), 60)
        lines.append(
            f"| time | {int(minutes)} min {seconds:.0f} s on {fit.get('devices')} device(s), "
            f"{fit.get('train_images_per_s')} train img/s (validation included) |"
        )
    lines += ["", "| result | value |", "| --- | --- |"]
    best = _best_val(folder)
    if best:
        lines.append(f"| best val/acc | {best[0]:.4f} (epoch {best[1]}) |")
    for key in sorted(test):
        lines.append(f"| {key} | {test[key]:.4f} |")
    calibration = facts.get("calibration", {})
    if calibration.get("temperature") is not None:
        lines.append(
            f"| temperature (fitted on val) | {calibration['temperature']:.3f}: NLL {calibration['nll_before']:.4f} -> "
            f"{calibration['nll_after']:.4f}, ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} |"
        )
    elif calibration.get("thresholds") is not None:
        lines.append(
            f"| per-class thresholds (fitted on val) | micro-F1 {calibration['f1_micro_at_0.5']:.4f} at 0.5 -> "
            f"{calibration['f1_micro_tuned']:.4f} |"
        )
    per_class = read_per_class(folder)
    if per_class is not None:
        names, values, metric = per_class
        title = "average precision" if metric == "ap" else "recall"
        order = [i for i in np.argsort(np.nan_to_num(values, nan=2.0)) if not math.isnan(values[i])]
        lines += ["", f"Per-class {title} on test, lowest first:", "", f"| class | {title} |", "| --- | --- |"]
        lines += [f"| {names[i]} | {values[i]:.1%} |" for i in order[:30]]
        if len(order) > 30:
            lines.append(f"| ({len(order) - 30} more in per_class.csv) | |")
    if fit.get("best_checkpoint"):
        lines += ["", f"Best checkpoint: `{fit['best_checkpoint']}`"]
    files = [p.name for p in sorted(folder.glob("*.png"))]
    if files:
        lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in files)]
    return "\n".join(lines) + "\n"


def write_run_summary(folder: str | Path) -> Path:
    path = Path(folder) / "summary.md"
    path.write_text(summary_text(folder))
    return path


def report(folder: str | Path) -> tuple[str, list[Path]]:
    """Redraw every plot of a run folder and rewrite its ``summary.md``; returns (summary, plots)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VisionTransferError(f"{folder}: no such run folder.")
    plots = draw_plots(folder)
    text = summary_text(folder)
    (folder / "summary.md").write_text(text)
    return text, plots
