"""A backbone grid's ``results.csv`` -> a Markdown table (mean +- 95% CI over seeds) and PNG plots."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats


def read_results(path: Path) -> list[dict[str, str]]:
    """Rows of a grid's ``results.csv`` (none when it does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t; 0 for one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * sem


def aggregate(rows: list[dict[str, str]], metric: str = "top1") -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(dataset, backbone, protocol) -> (mean, CI half-width, seeds)."""
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["backbone"], row["protocol"])].append(float(row[metric]))
    return {key: (*mean_ci(values), len(values)) for key, values in groups.items()}


def transfer_gains(rows: list[dict[str, str]]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(dataset, pretrained backbone, protocol) -> (mean top-1 gain over random init of the same
    architecture, CI half-width over paired seeds)."""
    random_init = {
        (r["dataset"], r["architecture"], r["protocol"], r["seed"]): r for r in rows if r["weights"] in ("none", "")
    }
    gains: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        baseline = random_init.get((row["dataset"], row["architecture"], row["protocol"], row["seed"]))
        if baseline is not None and baseline is not row:
            gains[(row["dataset"], row["backbone"], row["protocol"])].append(
                float(row["top1"]) - float(baseline["top1"])
            )
    return {key: mean_ci(values) for key, values in gains.items()}


def gain_verdict(mean: float, ci: float) -> str:
    """``positive`` or ``negative transfer`` when the 95% CI excludes zero, else ``no clear gain``
    (with one seed there is no interval: the sign decides)."""
    if mean - ci > 0:
        return "positive"
    if mean + ci < 0:
        return "**negative transfer**"
    return "no clear gain"


def markdown_table(rows: list[dict[str, str]]) -> str:
    stats_top1 = aggregate(rows, "top1")
    stats_f1 = aggregate(rows, "f1_macro")
    gains = transfer_gains(rows)
    costs = {r["backbone"]: (r["params_m"], r["gmacs"], r["feature_dim"]) for r in rows}
    header = ["dataset", "backbone", "protocol", "seeds", "top-1 (mean ± 95% CI)", "macro F1"]
    header += ["gain over random init", "params (M)", "GMACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (dataset, backbone, protocol), (mean, ci, n) in sorted(stats_top1.items()):
        f1 = stats_f1[(dataset, backbone, protocol)][0]
        gain = gains.get((dataset, backbone, protocol))
        gain_text = "" if gain is None else f"{100 * gain[0]:+.2f} ± {100 * gain[1]:.2f}"
        verdict = gain_verdict(*gain) if gain is not None else "positive"
        if verdict != "positive":
            gain_text += f" ({verdict})"
        params, gmacs, _ = costs[backbone]
        lines.append(
            f"| {dataset} | {backbone} | {protocol} | {n} | {100 * mean:.2f} ± {100 * ci:.2f} | {100 * f1:.2f} "
            f"| {gain_text} | {params} | {gmacs} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict[str, str]], out: Path) -> Path:
    stats_top1 = aggregate(rows)
    datasets = sorted({k[0] for k in stats_top1})
    labels = sorted({(k[1], k[2]) for k in stats_top1})
    fig = Figure(figsize=(max(6.0, 1.6 * len(datasets) * len(labels) / 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    for i, (backbone, protocol) in enumerate(labels):
        means = [100 * stats_top1.get((d, backbone, protocol), (math.nan, 0, 0))[0] for d in datasets]
        cis = [100 * stats_top1.get((d, backbone, protocol), (0, 0, 0))[1] for d in datasets]
        name = backbone if protocol == "linear_probe" else f"{backbone} [{protocol}]"
        ax.bar(np.arange(len(datasets)) + i * width, means, width, yerr=cis, capsize=3, label=name)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(labels) - 1) / 2, datasets)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy per backbone and dataset\n(error bars: 95% CI over seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_gain(rows: list[dict[str, str]], out: Path) -> Path | None:
    gains = transfer_gains(rows)
    if not gains:
        return None
    keys = sorted(gains)
    fig = Figure(figsize=(max(5.0, 1.2 * len(keys)), 4))
    ax = fig.subplots()
    values = [100 * gains[k][0] for k in keys]
    palette = {"positive": "tab:green", "no clear gain": "tab:gray", "**negative transfer**": "tab:red"}
    colors = [palette[gain_verdict(*gains[k])] for k in keys]
    ax.bar(range(len(keys)), values, yerr=[100 * gains[k][1] for k in keys], color=colors, capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), [f"{d}\n{b}" for d, b, _ in keys], fontsize=7)
    ax.set_ylabel("top-1 gain over random init (points)")
    ax.set_title("transfer gain, 95% CI (green: positive, grey: no clear gain, red: negative)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_cost(rows: list[dict[str, str]], out: Path) -> Path:
    stats_top1 = aggregate(rows)
    costs = {r["backbone"]: float(r["gmacs"]) for r in rows}
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for dataset in sorted({k[0] for k in stats_top1}):
        points = sorted((costs[b], 100 * m, b) for (d, b, _), (m, _, _) in stats_top1.items() if d == dataset)
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=dataset)
        for i, (x, y, name) in enumerate(points):  # alternate sides: equal-cost backbones stay readable
            ax.annotate(name, (x, y), fontsize=6, xytext=(4, -8 if i % 2 else 4), textcoords="offset points")
    ax.set_xlabel("backbone GMACs per image")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy vs backbone cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def write_grid_summary(folder: str | Path) -> list[Path]:
    """``summary.md`` and the three plots from ``results.csv`` in ``folder``."""
    folder = Path(folder)
    rows = read_results(folder / "results.csv")
    if not rows:
        return []
    (folder / "summary.md").write_text(markdown_table(rows))
    written = [
        folder / "summary.md",
        plot_accuracy(rows, folder / "accuracy.png"),
        plot_cost(rows, folder / "cost.png"),
    ]
    if gain := plot_gain(rows, folder / "transfer_gain.png"):
        written.append(gain)
    return written
