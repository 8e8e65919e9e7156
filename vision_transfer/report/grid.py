"""A backbone grid's ``results.csv`` -> Markdown tables, paired verdicts and PNG plots.

Intervals are Student-t 95% CIs over seeds (:func:`vision_transfer.evaluation.stats.mean_ci`). A few-shot
row counts once, by the mean of its episodes: the episodes of a seed share its split and test set,
so they are not independent samples of the score, and pooling them would shrink the interval
(digits lite0: +-1.02 over 60 episodes, +-4.08 over the 3 seed means).
Comparisons are *paired*: two backbones are compared on the same seeds (few-shot: their per-seed
episode means, from the same shots for every backbone), so what both share (an easy split) cancels
out; "A beats B" is claimed only when the paired difference's interval excludes zero.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vision_transfer.errors import ConfigError
from vision_transfer.evaluation.stats import mean_ci

log = logging.getLogger(__name__)
Key = tuple[str, str, str]  # (dataset, backbone, protocol)

# The settings that define a row's number -> the columns two rows must share to be compared on it:
# the summary averages a protocol's rows over seeds and compares them across backbones and
# datasets, so what the grid sets must agree per protocol, a backbone's weights per backbone, the
# data's configuration per dataset and a split's content per dataset and seed. A setting a
# protocol does not use is empty in its rows.
SETTINGS: dict[str, tuple[str, ...]] = {
    "image_size": ("protocol",),  # as asked; "default": each backbone's pretrained input size
    "input_size": ("protocol", "backbone", "weights"),  # the size the images were resized to
    "weights_id": ("backbone", "weights"),  # kind and content hash (or timm tag) of the weights
    "data_hash": ("dataset",),  # the datamodule's class and options, less paths and workers
    "split_hash": ("dataset", "seed"),  # the split's sample ids and labels
    "precision": ("protocol",),  # feature extraction's autocast, or the fine-tune Trainer's
    "solver": ("protocol",),
    "c_grid": ("protocol",),
    "probe_epochs": ("protocol",),
    "knn_ks": ("protocol",),
    "shots": ("protocol",),
    "episodes": ("protocol",),
    "finetune_epochs": ("protocol",),
    "finetune_lr": ("protocol",),
    "class_weight": ("protocol",),
}
# recorded, and warned about when they differ, but not refused: they change no setting, and a grid
# split across machines rarely has one torch build everywhere
VERSIONS = ("torch_version", "timm_version", "vision_transfer_version")


def read_results(path: Path) -> list[dict[str, str]]:
    """Rows of a grid's ``results.csv`` (none when it does not exist yet)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_results(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    """Write ``rows`` under ``columns`` (missing cells empty), replacing ``path`` at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def settings_recorded(row: dict[str, str]) -> bool:
    """Whether a row says how it was made (rows written before settings were recorded do not)."""
    return bool(row.get("vision_transfer_version"))


def _differences(rows: list[dict[str, str]], sources: list[str], columns: dict[str, tuple[str, ...]]) -> list[str]:
    """``column: value (source) vs value (source)`` for each column whose values differ within a scope."""
    found: dict[str, None] = {}
    for column, scope in columns.items():
        values: dict[tuple[str, ...], dict[str, str]] = defaultdict(dict)
        for row, source in zip(rows, sources, strict=True):
            values[tuple(row.get(s, "") for s in scope)].setdefault(row.get(column, ""), source)
        for seen in values.values():
            if len(seen) > 1:
                found[f"{column}: " + " vs ".join(f"{v or '(empty)'} ({src})" for v, src in seen.items())] = None
    return list(found)


def setting_conflicts(rows: list[dict[str, str]], sources: list[str]) -> list[str]:
    """The settings (:data:`SETTINGS`) on which rows that the summary would combine differ, with their values."""
    return _differences(rows, sources, SETTINGS)


def version_differences(rows: list[dict[str, str]], sources: list[str]) -> list[str]:
    """The package versions (:data:`VERSIONS`) that differ between rows, with their values."""
    return _differences(rows, sources, dict.fromkeys(VERSIONS, ()))


def merge_results(inputs: list[Path], output: Path) -> Path:
    """Concatenate grids run apart (by backbone, dataset or seed, on other machines) into ``output``.

    Rows are independent, one per run id (a run present twice keeps its first row), but only when
    they were made alike: rows whose settings differ are refused, naming the settings and values,
    as are files whose rows record no settings; differing package versions are logged.
    """
    rows: list[dict[str, str]] = []
    sources: list[str] = []
    for path in inputs:
        if not path.is_file():
            raise ConfigError(f"--merge: no results file at {path}.")
        found = read_results(path)
        if not all(settings_recorded(row) for row in found):
            raise ConfigError(
                f"{path}: no recorded settings (written before results.csv recorded them), so its rows cannot "
                "be checked against the others'; rerun its grid to merge it."
            )
        rows += found
        sources += [str(path)] * len(found)
    if conflicts := setting_conflicts(rows, sources):
        raise ConfigError(f"cannot merge rows made with different settings: {'; '.join(conflicts)}.")
    if versions := version_differences(rows, sources):
        log.warning("merged rows made with different package versions: %s.", "; ".join(versions))
    unique: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for row in rows:
        unique.setdefault(row["run"], row)
        columns += [c for c in row if c not in columns]
    write_results(output, list(unique.values()), columns)
    return output


def mean_half(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (NaN for one value: no interval)."""
    mean, low, high = mean_ci(values)
    return mean, (high - low) / 2


def plus_minus(mean: float, half: float, sign: str = "") -> str:
    """``mean ± half`` in points, or the mean alone when one value gave no interval."""
    text = f"{100 * mean:{sign}.2f}"
    return f"{text} (no CI: one seed)" if math.isnan(half) else f"{text} ± {100 * half:.2f}"


def headline(row: dict[str, str]) -> float:
    """A row's score: test top-1, or mAP for a multi-label dataset (its rows have no accuracy)."""
    return float(row["map"]) if row.get("map") not in (None, "") else float(row["top1"])


def scores(row: dict[str, str]) -> dict[str, float]:
    """A row's paired unit, its seed, and its score: a few-shot row's top-1 is the mean of its episodes."""
    return {row["seed"]: headline(row)}


def grouped(rows: list[dict[str, str]]) -> dict[Key, dict[str, float]]:
    """(dataset, backbone, protocol) -> {seed: top-1}."""
    out: dict[Key, dict[str, float]] = defaultdict(dict)
    for row in rows:
        out[(row["dataset"], row["backbone"], row["protocol"])].update(scores(row))
    return out


def aggregate(rows: list[dict[str, str]], metric: str = "top1") -> dict[Key, tuple[float, float, int]]:
    """(dataset, backbone, protocol) -> (mean, CI half-width over seeds, seeds)."""
    if metric == "top1":
        return {key: (*mean_half(list(units.values())), len(units)) for key, units in grouped(rows).items()}
    values: dict[Key, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric) not in (None, ""):
            values[(row["dataset"], row["backbone"], row["protocol"])].append(float(row[metric]))
    return {key: (*mean_half(v), len(v)) for key, v in values.items()}


def paired(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int] | None:
    """Mean of a - b over the seeds both have, its CI half-width and the number of pairs."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diff = [a[u] - b[u] for u in common]
    return (*mean_half(diff), len(common))


def verdict(mean: float, ci: float, n: int) -> str:
    """``better`` / ``worse`` when the 95% CI of the paired difference excludes zero, else
    ``not significant`` (a single pair has no interval: never significant)."""
    if n < 2:
        return "not significant (one pair)"
    if mean - ci > 0:
        return "better"
    if mean + ci < 0:
        return "worse"
    return "not significant"


def transfer_gains(rows: list[dict[str, str]]) -> dict[Key, tuple[float, float, int]]:
    """(dataset, pretrained backbone, protocol) -> paired top-1 gain over random init of the same architecture."""
    groups = grouped(rows)
    architecture = {r["backbone"]: r["architecture"] for r in rows}
    random_init = {
        (r["dataset"], r["architecture"], r["protocol"]): r["backbone"] for r in rows if r["weights"] in ("none", "")
    }
    gains = {}
    for (dataset, backbone, protocol), units in groups.items():
        baseline = random_init.get((dataset, architecture[backbone], protocol))
        if baseline is None or baseline == backbone:
            continue
        gain = paired(units, groups[(dataset, baseline, protocol)])
        if gain is not None:
            gains[(dataset, backbone, protocol)] = gain
    return gains


def gain_verdict(mean: float, ci: float, n: int = 2) -> str:
    """``positive``, ``**negative transfer**`` or ``not significant`` (the CI of the paired gain contains zero)."""
    text = verdict(mean, ci, n)
    return {"better": "positive", "worse": "**negative transfer**"}.get(text, text)


def rankings(rows: list[dict[str, str]]) -> list[str]:
    """Per dataset and protocol: backbones from best to worst, each against the next with a paired verdict."""
    groups = grouped(rows)
    lines = []
    for dataset, protocol in sorted({(d, p) for d, _, p in groups}):
        members = sorted(
            ((b, units) for (d, b, p), units in groups.items() if d == dataset and p == protocol),
            key=lambda item: -float(np.mean(list(item[1].values()))),
        )
        parts = [f"{members[0][0]} ({100 * np.mean(list(members[0][1].values())):.2f})"]
        for (a, units_a), (b, units_b) in pairwise(members):
            comparison = paired(units_a, units_b)
            if comparison is None:
                parts.append(f"? {b}")
                continue
            mean, ci, n = comparison
            sign = ">" if verdict(mean, ci, n) == "better" else "~"
            parts.append(
                f"{sign} {b} ({100 * np.mean(list(units_b.values())):.2f}; {a} {plus_minus(mean, ci, '+')}, "
                f"{verdict(mean, ci, n)} over {n} seed{'s' if n > 1 else ''})"
            )
        lines.append(f"- **{dataset}, {protocol}**: " + " ".join(parts))
    return lines


def markdown_table(rows: list[dict[str, str]]) -> str:
    stats_top1 = aggregate(rows, "top1")
    stats_bal = aggregate(rows, "balanced_acc")
    stats_f1 = aggregate(rows, "f1_macro")
    gains = transfer_gains(rows)
    costs = {r["backbone"]: (r["params_m"], r["gmacs"]) for r in rows}
    map_datasets = {r["dataset"] for r in rows if r.get("map") not in (None, "")}  # multi-label
    header = ["dataset", "backbone", "protocol", "seeds", "top-1 or mAP* (mean ± 95% CI)", "balanced acc.", "macro F1"]
    header += ["gain over random init", "params (M)", "GMACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, (mean, ci, n) in sorted(stats_top1.items()):
        dataset, backbone, protocol = key
        balanced = f"{100 * stats_bal[key][0]:.2f}" if key in stats_bal else ""
        f1 = f"{100 * stats_f1[key][0]:.2f}" if key in stats_f1 else ""
        gain = gains.get(key)
        gain_text = "" if gain is None else f"{plus_minus(gain[0], gain[1], '+')} ({gain_verdict(*gain)})"
        params, gmacs = costs[backbone]
        score = f"{plus_minus(mean, ci)}{'*' if dataset in map_datasets else ''}"
        cells = [dataset, backbone, protocol, str(n), score, balanced, f1, gain_text, params, gmacs]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "\\* mAP (macro average precision) of a multi-label dataset. "
        "CIs: Student t, 95%, over seeds; a few-shot row's score for a seed is the mean of each seed's episodes "
        "(they share the seed's split and test set, so they are not independent samples). Gains and rankings are "
        "paired by seed (few-shot: on those per-seed means, whose episodes draw the same shots for every backbone).",
        "",
        "Rankings (each backbone against the next; `>`: better, the paired 95% CI excludes zero; "
        "`~`: not significant):",
        "",
        *rankings(rows),
    ]
    return "\n".join(lines + notes) + "\n"


PROTOCOL_HATCH = {"linear_probe": "", "knn": "//", "fewshot": "..", "full": "xx", "gradual": "\\\\"}


def plot_accuracy(rows: list[dict[str, str]], out: Path) -> Path:
    """Grouped bars: one group per dataset, one bar per (backbone, protocol); the legend sits beside the axes."""
    stats_top1 = aggregate(rows)
    datasets = sorted({k[0] for k in stats_top1})
    labels = sorted({(k[1], k[2]) for k in stats_top1}, key=lambda bp: (bp[1], bp[0]))
    backbones = sorted({b for b, _ in labels})
    colors = {b: f"C{i}" for i, b in enumerate(backbones)}
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(max(6.0, 0.5 * len(datasets) * len(labels)) + 3.5, 4.5))
    ax = fig.subplots()
    for i, (backbone, protocol) in enumerate(labels):
        means = [100 * stats_top1.get((d, backbone, protocol), (math.nan, 0, 0))[0] for d in datasets]
        cis = [100 * np.nan_to_num(stats_top1.get((d, backbone, protocol), (0, 0, 0))[1]) for d in datasets]
        ax.bar(
            np.arange(len(datasets)) + i * width, means, width, yerr=cis, capsize=2, color=colors[backbone],
            hatch=PROTOCOL_HATCH.get(protocol, ""), edgecolor="white", label=f"{backbone} [{protocol}]",
        )  # fmt: skip
    ax.set_xticks(np.arange(len(datasets)) + width * (len(labels) - 1) / 2, datasets)
    ax.set_ylabel("test top-1 (%); mAP for multi-label data")
    ax.set_ylim(0, 100)  # a wide interval (few seeds) is cut at the possible range, not the axes stretched
    ax.set_title("accuracy per backbone, protocol and dataset (error bars: 95% CI)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()  # the legend is outside the axes: tight_layout makes room for it, never over the bars
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


GAIN_COLORS = {"positive": "tab:green", "**negative transfer**": "tab:red"}


def plot_gain(rows: list[dict[str, str]], out: Path) -> Path | None:
    """Pretrained minus random-init top-1 (paired), coloured by verdict; a CI crossing zero is grey and labelled."""
    gains = transfer_gains(rows)
    if not gains:
        return None
    keys = sorted(gains)
    fig = Figure(figsize=(max(5.0, 1.3 * len(keys)), 4.2))
    ax = fig.subplots()
    values = [100 * gains[k][0] for k in keys]
    verdicts = [gain_verdict(*gains[k]) for k in keys]
    ax.bar(
        range(len(keys)), values, yerr=[100 * np.nan_to_num(gains[k][1]) for k in keys],
        color=[GAIN_COLORS.get(v, "tab:gray") for v in verdicts], capsize=3,
    )  # fmt: skip
    for x, (value, text) in enumerate(zip(values, verdicts, strict=True)):
        if text.startswith("not significant"):
            ax.annotate("not\nsignificant", (x, value), ha="center", va="bottom" if value >= 0 else "top",
                        fontsize=6, xytext=(0, 3 if value >= 0 else -3), textcoords="offset points")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), [f"{d}\n{b}\n[{p}]" for d, b, p in keys], fontsize=6)
    ax.set_ylabel("top-1 gain over random init (points)")
    ax.set_title("transfer gain, paired 95% CI (green: positive, red: negative, grey: not significant)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_cost(rows: list[dict[str, str]], out: Path) -> Path:
    stats_top1 = aggregate(rows)
    costs = {r["backbone"]: float(r["gmacs"]) for r in rows}
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for dataset, protocol in sorted({(k[0], k[2]) for k in stats_top1}):
        points = sorted(
            (costs[b], 100 * m, b) for (d, b, p), (m, _, _) in stats_top1.items() if d == dataset and p == protocol
        )
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{dataset} [{protocol}]")
        for i, (x, y, name) in enumerate(points):  # alternate sides: equal-cost backbones stay readable
            ax.annotate(name, (x, y), fontsize=6, xytext=(4, -8 if i % 2 else 4), textcoords="offset points")
    ax.set_xlabel("backbone GMACs per image")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy vs backbone cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def write_grid_summary(folder: str | Path) -> list[Path]:
    """``summary.md`` and the three plots from ``results.csv`` in ``folder``."""
    folder = Path(folder)
    rows = read_results(folder / "results.csv")
    if not rows:
        return []
    recorded = [row for row in rows if settings_recorded(row)]  # older files: settings unknown, drawn as they are
    if conflicts := setting_conflicts(recorded, [row["run"] for row in recorded]):
        raise ConfigError(f"{folder / 'results.csv'} holds rows made with different settings: {'; '.join(conflicts)}.")
    (folder / "summary.md").write_text(markdown_table(rows))
    written = [
        folder / "summary.md",
        plot_accuracy(rows, folder / "accuracy.png"),
        plot_cost(rows, folder / "cost.png"),
    ]
    if gain := plot_gain(rows, folder / "transfer_gain.png"):
        written.append(gain)
    return written
