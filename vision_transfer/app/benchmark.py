"""Backbones x datasets x seeds x protocols -> one row per run in ``results.csv``, resumable.

Every row records the settings that made its number (:data:`vision_transfer.report.grid.SETTINGS`)
and the package versions. A resumed grid reuses a row only when it was made with this grid's
settings (others are recomputed and replaced, and said to be); rows of other runs in the folder
must agree with this grid's settings, or the grid is refused before it runs.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm  # text bars: also in notebooks, without ipywidgets

from vision_transfer.datamodules import ImageDataModule
from vision_transfer.errors import ConfigError
from vision_transfer.evaluation.knn import KNN_KS
from vision_transfer.features.cache import canonical_json
from vision_transfer.report.grid import (
    SETTINGS,
    VERSIONS,
    read_results,
    setting_conflicts,
    settings_recorded,
    version_differences,
    write_results,
)

log = logging.getLogger(__name__)
Protocol = Literal["linear_probe", "knn", "fewshot", "full", "gradual"]
FEATURE_PROTOCOLS = ("linear_probe", "knn", "fewshot")  # on the feature cache: no backbone pass once warm
FINE_TUNES = ("full", "gradual")
# option -> the protocols that use it: given to a grid that runs none of them, it is refused
OPTION_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "solver": ("linear_probe",),
    "c_grid_size": ("linear_probe",),
    "probe_epochs": ("linear_probe",),
    "knn_ks": ("knn",),
    "fewshot_shots": ("fewshot",),
    "fewshot_episodes": ("fewshot",),
    "finetune_epochs": FINE_TUNES,
    "finetune_lr": FINE_TUNES,
    "class_weight": ("linear_probe", *FINE_TUNES),
}
SOLVER_OPTIONS = {"c_grid_size": "lbfgs", "probe_epochs": "sgd"}  # the linear probe's, for one solver only
DEFAULTS: dict[str, Any] = {
    "solver": "lbfgs", "c_grid_size": 45, "probe_epochs": 10, "knn_ks": KNN_KS, "fewshot_shots": 5,
    "fewshot_episodes": 20, "finetune_epochs": 3, "finetune_lr": 2e-3, "class_weight": None,
}  # fmt: skip
GRID_OPTIONS = {*OPTION_PROTOCOLS, "cache_dir", "progress"}


def fine_tune_precision() -> str:
    """What the grid's fine-tunes train at: what ``fit`` picks here (bf16-mixed on a bf16 GPU, else 32-true)."""
    from vision_transfer.app.lightning_cli import default_precision

    return default_precision("auto") or "32-true"


# datamodule options that say where the data is and how fast it loads, not what it is; the split
# seed is the row's own seed
NOT_DATA = {"root", "csv_path", "download", "num_workers", "predict_paths", "split_seed"}
COLUMNS = [
    "run", "backbone", "architecture", "weights", "dataset", "protocol", "seed", "top1", "top5", "balanced_acc",
    "f1_macro", "map", "f1_micro", "ci_low", "ci_high", "episode_scores", "chosen", "feature_dim", "params_m", "gmacs",
    "extract_s", "train_s", *SETTINGS, *VERSIONS,
]  # fmt: skip


@dataclass
class BackboneEntry:
    """One backbone of the grid.

    Args:
        name: timm architecture.
        weights: weight source (``packaged``, ``none`` for random init, ``timm``, a file...).
        label: name in tables and plots; defaults to ``name`` plus ``(random)`` for ``none``.
    """

    name: str
    weights: str = "auto"
    label: str | None = None

    @property
    def display(self) -> str:
        return self.label or (f"{self.name} (random)" if self.weights in ("none", None) else self.name)


@dataclass
class DatasetEntry:
    """One dataset of the grid: a datamodule configuration and its name in tables."""

    name: str
    data: ImageDataModule


def run_id(backbone: BackboneEntry, dataset: str, protocol: str, seed: int) -> str:
    return f"{dataset}|{backbone.display}|{backbone.weights}|{protocol}|{seed}"


def _append(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
        f.flush()


def _header(path: Path) -> list[str]:
    """The column names of a CSV file (none when it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def backbone_cost(name: str, image_size: int) -> tuple[float, float]:
    """(million parameters, GMACs per image at ``image_size``) of the headless backbone."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return params, counter.get_total_flops() / 2e9


def _with_seed(data: ImageDataModule, seed: int) -> ImageDataModule:
    """A new datamodule like ``data`` whose split and subsets use ``seed``."""
    return data.with_options(split_seed=seed)


def resolve_options(protocols: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """The grid's options with their defaults, after refusing any that no protocol of the grid would use.

    Raises:
        ConfigError: an unknown option; one set for protocols (or a solver) the grid does not run;
            ``class_weight`` with a protocol that weighs no classes (k-NN, few-shot), whose rows
            would look weighted and not be.
    """
    unknown = set(options) - GRID_OPTIONS
    if unknown:
        raise ConfigError(
            f"run_grid: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(GRID_OPTIONS))}."
        )
    given = {k: v for k, v in options.items() if v is not None}
    for name, uses in OPTION_PROTOCOLS.items():
        if name in given and not set(uses) & set(protocols):
            raise ConfigError(
                f"{name}={given[name]!r} is for the {', '.join(uses)} protocol(s) only; this grid runs "
                f"{', '.join(protocols)}."
            )
    ignored = [p for p in protocols if p not in OPTION_PROTOCOLS["class_weight"]]
    if given.get("class_weight") and ignored:
        raise ConfigError(
            f"class_weight={given['class_weight']!r}: the {' and '.join(ignored)} protocol(s) weigh no classes; "
            "run them in a benchmark without class_weight."
        )
    resolved = DEFAULTS | given
    for name, solver in SOLVER_OPTIONS.items():
        if name in given and resolved["solver"] != solver:
            raise ConfigError(
                f"{name}={given[name]!r} is for solver {solver} only; this grid's solver is {resolved['solver']}."
            )
    return resolved


def _short_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


def run_settings(
    spec: dict[str, Any], data: ImageDataModule, protocol: str, image_size: int | None, options: dict[str, Any]
) -> dict[str, str]:
    """The settings a run of ``protocol`` is made with (every column of :data:`SETTINGS`; empty: not used).

    ``spec`` is the backbone's feature spec (``FeatureSpec.to_dict()``: weights identity, input size);
    ``data`` has its seed's splits; ``options`` are :func:`resolve_options`'s. The runs below take
    their settings from the same ``options``, so a row records what made it.
    """
    weights = spec["weights"]
    hparams = {k: v for k, v in data.hparams.items() if k not in NOT_DATA}
    splits = {name: [list(s.ids), np.asarray(s.labels).tolist()] for name, s in data.splits.items()}
    settings = {
        "image_size": str(image_size or "default"),
        "input_size": str(spec["data_config"]["input_size"][-1]),
        "weights_id": f"{weights['kind']}:{(weights.get('sha256') or '')[:16] or weights.get('uri', '')}",
        "data_hash": _short_hash([type(data).__name__, hparams, data.class_names]),
        "split_hash": _short_hash(splits),
        "precision": options["precision"] if protocol in FEATURE_PROTOCOLS else fine_tune_precision(),
    }
    class_weight = options["class_weight"] or "none"
    if protocol == "linear_probe":
        settings |= {"solver": options["solver"], "class_weight": class_weight}
        if options["solver"] == "lbfgs":
            settings["c_grid"] = f"logspace(-6,5,{options['c_grid_size']})"
        else:
            settings["probe_epochs"] = str(options["probe_epochs"])
    elif protocol == "knn":
        settings["knn_ks"] = ";".join(str(k) for k in options["knn_ks"])
    elif protocol == "fewshot":
        settings |= {"shots": str(options["fewshot_shots"]), "episodes": str(options["fewshot_episodes"])}
    else:
        settings |= {"finetune_epochs": str(options["finetune_epochs"]), "finetune_lr": f"{options['finetune_lr']:g}"}
        settings["class_weight"] = class_weight
    return {column: settings.get(column, "") for column in SETTINGS}


def _extract(entry: BackboneEntry, data: ImageDataModule, image_size: int | None, options: dict[str, Any]) -> Any:
    from vision_transfer.app.protocols import extract_datamodule

    caches, _ = extract_datamodule(
        data, entry.name, entry.weights, image_size=image_size, cache_dir=options.get("cache_dir"),
        precision=options["precision"], progress=False,
    )  # fmt: skip
    return caches


def _linear_probe(
    entry: BackboneEntry, data: ImageDataModule, seed: int, image_size: int | None, options: dict[str, Any]
) -> dict[str, Any]:
    from vision_transfer.app.protocols import linear_probe

    start = time.perf_counter()
    caches = _extract(entry, data, image_size, options)
    extract_s = time.perf_counter() - start
    solver = options["solver"]
    solver_options: dict[str, Any] = {"epochs": options["probe_epochs"], "seed": seed}
    if solver == "lbfgs":
        solver_options = {"c_grid_size": options["c_grid_size"]}
    start = time.perf_counter()
    result, _ = linear_probe(caches, data, solver, class_weight=options["class_weight"], **solver_options)
    train_s = time.perf_counter() - start
    feature_dim = caches["train"].dim
    chosen = ";".join(f"{k}={v:.3g}" for k, v in result.chosen.items() if isinstance(v, (int, float)))
    # the test scores of the chosen head, in the task kind's columns (as the fine-tunes' rows)
    scores = result.test_scores()
    columns = {column: scores[key] for column, key in data.task_kind.grid_columns.items() if key in scores}
    return {**columns, "chosen": chosen, "feature_dim": feature_dim, "extract_s": extract_s, "train_s": train_s}


def _knn(
    entry: BackboneEntry, data: ImageDataModule, image_size: int | None, options: dict[str, Any]
) -> dict[str, Any]:
    from vision_transfer.app.protocols import knn_datamodule

    start = time.perf_counter()
    _extract(entry, data, image_size, options)
    extract_s = time.perf_counter() - start
    result = knn_datamodule(
        data, entry.name, entry.weights, ks=tuple(options["knn_ks"]), image_size=image_size,
        cache_dir=options.get("cache_dir"), precision=options["precision"], progress=False,
    )  # fmt: skip
    return {"top1": result.test_top1, "top5": result.test_top5, "balanced_acc": result.test_balanced,
            "chosen": f"k={result.k}", "extract_s": extract_s, "train_s": result.seconds}  # fmt: skip


def _fewshot(
    entry: BackboneEntry, data: ImageDataModule, seed: int, image_size: int | None, options: dict[str, Any]
) -> dict[str, Any]:
    from vision_transfer.app.protocols import fewshot_datamodule

    start = time.perf_counter()
    _extract(entry, data, image_size, options)
    extract_s = time.perf_counter() - start
    shots, episodes = options["fewshot_shots"], options["fewshot_episodes"]
    result = fewshot_datamodule(
        data, entry.name, entry.weights, shots=shots, episodes=episodes, seed=seed, image_size=image_size,
        cache_dir=options.get("cache_dir"), precision=options["precision"], progress=False,
    )  # fmt: skip
    return {"top1": result.mean, "ci_low": result.ci_low, "ci_high": result.ci_high,
            "episode_scores": ";".join(f"{s:.4f}" for s in result.scores),
            "chosen": f"shots={shots};episodes={len(result.episodes)}", "extract_s": extract_s,
            "train_s": result.seconds}  # fmt: skip


def _fine_tune(
    entry: BackboneEntry,
    data: ImageDataModule,
    seed: int,
    image_size: int | None,
    protocol: Protocol,
    options: dict[str, Any],
) -> dict[str, Any]:
    import pytorch_lightning as pl

    from vision_transfer.backbones import preprocessing
    from vision_transfer.tasks import ImageClassifier

    pl.seed_everything(seed, verbose=False)
    epochs = options["finetune_epochs"]
    data = data.with_options(data_config=preprocessing(entry.name, entry.weights, image_size))
    model = ImageClassifier.for_data(
        data, backbone=entry.name, weights=entry.weights, mode=protocol, image_size=image_size,  # type: ignore[arg-type]
        lr=options["finetune_lr"], unfreeze_every=max(1, epochs // 4), warmup_epochs=0.3,
        class_weighting=options["class_weight"] or "none",
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, precision=fine_tune_precision(),  # type: ignore[arg-type]
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    train_s = time.perf_counter() - start
    metrics = trainer.test(model, data, verbose=False)[0]
    scores = {column: metrics[f"test/{key}"] for column, key in model.task_kind.grid_columns.items()}
    return {**scores, "chosen": f"epochs={epochs}", "feature_dim": model.backbone.num_features, "train_s": train_s}


def grid(
    backbones: list[BackboneEntry], datasets: list[DatasetEntry], seeds: list[int], protocols: list[Protocol]
) -> Iterator[tuple[BackboneEntry, DatasetEntry, Protocol, int]]:
    for dataset in datasets:
        for seed in seeds:
            for protocol in protocols:
                for backbone in backbones:
                    yield backbone, dataset, protocol, seed


@dataclass
class _Run:
    """One cell of the grid: what it runs on, and the row identity and settings it will be recorded with."""

    backbone: BackboneEntry
    protocol: Protocol
    seed: int
    data: ImageDataModule  # the dataset at this seed, splits read (copied for each run)
    row: dict[str, str]  # run id, identity columns, settings and versions


def _changes(row: dict[str, str], expected: dict[str, str]) -> str | None:
    """How a finished row's settings differ from ``expected`` (None: made alike)."""
    if not settings_recorded(row):
        return "no recorded settings"
    changed = [
        f"{c} {row.get(c) or '(empty)'} -> {expected[c] or '(empty)'}"
        for c in SETTINGS
        if row.get(c, "") != expected[c]
    ]
    return ", ".join(changed) or None


def _plan(results: Path, existing: list[dict[str, str]], runs: list[_Run]) -> tuple[list[_Run], list[dict[str, str]]]:
    """The runs to compute and the rows to keep, from ``results.csv``'s ``existing`` rows and this grid.

    A run's row is reused only when made with the run's settings; other rows of it are dropped (the
    run is recomputed), and said to be. Rows of runs not in this grid stay, so they must agree with
    it, or the grid is refused.
    """
    planned = {run.row["run"]: run for run in runs}
    finished: dict[str, dict[str, str]] = {}
    for row in existing:
        finished.setdefault(row["run"], row)
    others = [row for row in existing if row["run"] not in planned]
    for row in others:
        if not settings_recorded(row):
            raise ConfigError(
                f"{results}: run {row['run']} has no recorded settings and is not part of this grid, so it cannot "
                "be checked against it; use another output folder."
            )
    sources = [f"{row['run']} in {results}" for row in others] + ["this grid"] * len(runs)
    if conflicts := setting_conflicts(others + [run.row for run in runs], sources):
        raise ConfigError(
            f"{results} holds other runs made with other settings ({'; '.join(conflicts)}); use another output "
            "folder, or run them again with these settings."
        )
    stale = {
        rid: change for rid, row in finished.items() if rid in planned and (change := _changes(row, planned[rid].row))
    }
    if stale:
        listed = "; ".join(f"{rid} ({change})" for rid, change in stale.items())
        log.warning("%s: recomputing %d run(s) made with other settings: %s", results, len(stale), listed)
    kept = [row for row in existing if row["run"] not in stale]
    reused = [row for row in kept if row["run"] in planned]
    if versions_differ := version_differences(
        reused + [run.row for run in runs], [row["run"] for row in reused] + ["now"] * len(runs)
    ):
        log.warning("%s: kept runs made with other package versions: %s", results, "; ".join(versions_differ))
    todo = [run for run in runs if run.row["run"] not in finished or run.row["run"] in stale]
    return todo, kept


def run_grid(
    backbones: list[BackboneEntry],
    datasets: list[DatasetEntry],
    seeds: list[int],
    output: str | Path,
    protocols: list[Protocol] | None = None,
    image_size: int | None = None,
    **options: Any,
) -> Path:
    """Run every cell of the grid whose row in ``results.csv`` is missing or made with other settings.

    Options (each refused when no protocol of the grid uses it; defaults in :data:`DEFAULTS`):
    ``solver``, ``c_grid_size`` (lbfgs), ``probe_epochs`` (sgd) and ``class_weight`` for
    ``linear_probe``; ``knn_ks``; ``fewshot_shots`` and ``fewshot_episodes``; ``finetune_epochs``,
    ``finetune_lr`` and ``class_weight`` for ``full``/``gradual``; ``cache_dir`` and ``progress``.
    """
    from vision_transfer.app.protocols import package_versions, require_single_label
    from vision_transfer.features.extract import feature_spec, resolve_precision

    protocols = protocols or ["linear_probe"]
    opts = resolve_options(list(protocols), options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    opts["precision"] = resolve_precision("auto", device)  # what extraction would pick: pinned, and recorded
    folder = Path(output)
    results = folder / "results.csv"
    # every run's settings before any runs: a refusal (multi-label data, a folder of other settings) costs nothing
    seeded: dict[tuple[str, int], ImageDataModule] = {}
    specs: dict[tuple[str, str], dict[str, Any]] = {}  # hashing a weights file once, not once per run
    recorded = package_versions()
    runs = []
    for backbone, dataset, protocol, seed in grid(backbones, datasets, seeds, protocols):
        if (dataset.name, seed) not in seeded:
            seeded[(dataset.name, seed)] = _with_seed(dataset.data, seed)
            seeded[(dataset.name, seed)].prepare_splits()
        data = seeded[(dataset.name, seed)]
        if protocol in ("knn", "fewshot"):
            require_single_label(data, protocol, dataset.name)
        row = {"run": run_id(backbone, dataset.name, protocol, seed), "backbone": backbone.display,
               "architecture": backbone.name, "weights": backbone.weights, "dataset": dataset.name,
               "protocol": protocol, "seed": str(seed)}  # fmt: skip
        if (backbone.name, backbone.weights) not in specs:
            spec = feature_spec(backbone.name, backbone.weights, image_size=image_size, precision=opts["precision"])
            specs[(backbone.name, backbone.weights)] = spec.to_dict()
        row |= run_settings(specs[(backbone.name, backbone.weights)], data, protocol, image_size, opts) | recorded
        runs.append(_Run(backbone, protocol, seed, data, row))
    existing = read_results(results)
    todo, kept = _plan(results, existing, runs)
    folder.mkdir(parents=True, exist_ok=True)
    if kept != existing or _header(results) not in ([], COLUMNS):
        write_results(results, kept, COLUMNS)  # stale rows out; an older file gains the settings columns
    costs: dict[tuple[str, str], tuple[float, float]] = {}
    bar = tqdm(todo, desc="benchmark", unit="run", disable=not opts.get("progress", True))
    for run in bar:
        bar.set_postfix_str(run.row["run"][:60])
        data = copy.deepcopy(run.data)  # each run reads (and caches splits in) its own copy
        if run.protocol == "linear_probe":
            row = _linear_probe(run.backbone, data, run.seed, image_size, opts)
        elif run.protocol == "knn":
            row = _knn(run.backbone, data, image_size, opts)
        elif run.protocol == "fewshot":
            row = _fewshot(run.backbone, data, run.seed, image_size, opts)
        else:
            row = _fine_tune(run.backbone, data, run.seed, image_size, run.protocol, opts)
        size = run.row["input_size"]
        if (run.backbone.name, size) not in costs:
            costs[(run.backbone.name, size)] = backbone_cost(run.backbone.name, int(size))
        params, gmacs = costs[(run.backbone.name, size)]
        _append(results, row | run.row | {"params_m": f"{params:.2f}", "gmacs": f"{gmacs:.3f}"})
    return results
