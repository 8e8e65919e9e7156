"""Backbones x datasets x seeds x protocols -> one row per run in ``results.csv``, resumable."""

from __future__ import annotations

import copy
import csv
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
from vision_transfer.report.grid import read_results

Protocol = Literal["linear_probe", "knn", "fewshot", "full", "gradual"]
FEATURE_PROTOCOLS = ("linear_probe", "knn", "fewshot")  # on the feature cache: no backbone pass once warm
GRID_OPTIONS = {
    "cache_dir", "solver", "c_grid_size", "probe_epochs", "finetune_epochs", "finetune_lr", "progress",
    "fewshot_shots", "fewshot_episodes", "knn_ks", "class_weight",
}  # fmt: skip
COLUMNS = [
    "run", "backbone", "architecture", "weights", "dataset", "protocol", "seed", "top1", "top5", "balanced_acc",
    "f1_macro", "map", "f1_micro", "ci_low", "ci_high", "episode_scores", "chosen", "feature_dim", "params_m", "gmacs",
    "extract_s", "train_s",
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
    """A copy of the datamodule whose split and subsets use ``seed``."""
    clone = copy.deepcopy(data)
    clone.hparams["split_seed"] = seed
    clone.splits = {}
    return clone


def _linear_probe(
    entry: BackboneEntry, data: ImageDataModule, seed: int, image_size: int | None, options: dict[str, Any]
) -> dict[str, Any]:
    from vision_transfer.app.features import extract_datamodule, split_arrays
    from vision_transfer.features.probe import run_probe

    start = time.perf_counter()
    caches, _ = extract_datamodule(
        data, entry.name, entry.weights, image_size=image_size, cache_dir=options.get("cache_dir"), progress=False
    )
    extract_s = time.perf_counter() - start
    arrays = split_arrays(caches, data)
    train, val, test = arrays["train"], arrays["val"], arrays["test"]
    classes = len(data.class_names or [])
    solver = options.get("solver", "lbfgs")
    probe_options = (
        {"c_grid": tuple(np.logspace(-6, 5, options.get("c_grid_size", 45)))}
        if solver == "lbfgs"
        else {"epochs": options.get("probe_epochs", 10), "seed": seed}
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    if options.get("class_weight"):
        probe_options["class_weight"] = options["class_weight"]
    result = run_probe(train, val, test, classes, solver, **probe_options)
    train_s = time.perf_counter() - start
    chosen = ";".join(f"{k}={v:.3g}" for k, v in result.chosen.items() if isinstance(v, (int, float)))
    if data.splits["train"].multilabel:  # mAP and micro-F1, never an accuracy
        return {"map": result.test_map, "f1_micro": result.test_f1_micro, "chosen": chosen,
                "feature_dim": train[0].shape[1], "extract_s": extract_s, "train_s": train_s}  # fmt: skip
    return {"top1": result.test_acc, "top5": result.test_acc_top5, "balanced_acc": result.balanced_accuracy,
            "f1_macro": result.f1_macro, "chosen": chosen, "feature_dim": train[0].shape[1],
            "extract_s": extract_s, "train_s": train_s}  # fmt: skip


def _knn(
    entry: BackboneEntry, data: ImageDataModule, image_size: int | None, options: dict[str, Any]
) -> dict[str, Any]:
    from vision_transfer.app.features import extract_datamodule, knn_datamodule

    start = time.perf_counter()
    extract_datamodule(
        data, entry.name, entry.weights, image_size=image_size, cache_dir=options.get("cache_dir"), progress=False
    )
    extract_s = time.perf_counter() - start
    ks = tuple(options["knn_ks"]) if options.get("knn_ks") else None
    result = knn_datamodule(
        data,
        entry.name,
        entry.weights,
        ks=ks,
        image_size=image_size,
        cache_dir=options.get("cache_dir"),
        progress=False,
    )
    return {"top1": result.test_top1, "top5": result.test_top5, "balanced_acc": result.test_balanced,
            "chosen": f"k={result.k}", "extract_s": extract_s, "train_s": result.seconds}  # fmt: skip


def _fewshot(
    entry: BackboneEntry, data: ImageDataModule, seed: int, image_size: int | None, options: dict[str, Any]
) -> dict[str, Any]:
    from vision_transfer.app.features import extract_datamodule, fewshot_datamodule

    start = time.perf_counter()
    extract_datamodule(
        data, entry.name, entry.weights, image_size=image_size, cache_dir=options.get("cache_dir"), progress=False
    )
    extract_s = time.perf_counter() - start
    shots, episodes = options.get("fewshot_shots", 5), options.get("fewshot_episodes", 20)
    result = fewshot_datamodule(
        data, entry.name, entry.weights, shots=shots, episodes=episodes, seed=seed, image_size=image_size,
        cache_dir=options.get("cache_dir"), progress=False,
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

    from vision_transfer.app.connect import connect
    from vision_transfer.tasks import ImageClassifier

    pl.seed_everything(seed, verbose=False)
    epochs = options.get("finetune_epochs", 3)
    model = ImageClassifier(
        entry.name, weights=entry.weights, mode=protocol, image_size=image_size,  # type: ignore[arg-type]
        lr=options.get("finetune_lr", 2e-3), unfreeze_every=max(1, epochs // 4), warmup_epochs=0.3,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    data = connect(model, data)  # type: ignore[assignment]
    trainer.fit(model, data)
    train_s = time.perf_counter() - start
    metrics = trainer.test(model, data, verbose=False)[0]
    if model.multilabel:
        scores = {k: metrics[f"test/{k}"] for k in ("map", "f1_micro", "f1_macro")}
        return {**scores, "chosen": f"epochs={epochs}", "feature_dim": model.backbone.num_features, "train_s": train_s}
    return {"top1": metrics["test/acc"], "top5": metrics["test/acc_top5"], "balanced_acc": metrics["test/balanced_acc"],
            "f1_macro": metrics["test/f1_macro"], "chosen": f"epochs={epochs}",
            "feature_dim": model.backbone.num_features, "train_s": train_s}  # fmt: skip


def grid(
    backbones: list[BackboneEntry], datasets: list[DatasetEntry], seeds: list[int], protocols: list[Protocol]
) -> Iterator[tuple[BackboneEntry, DatasetEntry, Protocol, int]]:
    for dataset in datasets:
        for seed in seeds:
            for protocol in protocols:
                for backbone in backbones:
                    yield backbone, dataset, protocol, seed


def run_grid(
    backbones: list[BackboneEntry],
    datasets: list[DatasetEntry],
    seeds: list[int],
    output: str | Path,
    protocols: list[Protocol] | None = None,
    image_size: int | None = None,
    **options: Any,
) -> Path:
    """Run every missing cell of the grid; finished runs (rows in ``results.csv``) are skipped."""
    unknown = set(options) - GRID_OPTIONS
    if unknown:
        raise ConfigError(
            f"run_grid: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(GRID_OPTIONS))}."
        )
    protocols = protocols or ["linear_probe"]
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.csv"
    done = {row["run"] for row in read_results(results)}
    cells = list(grid(backbones, datasets, seeds, protocols))
    costs: dict[str, tuple[float, float]] = {}
    bar = tqdm(cells, desc="benchmark", unit="run", disable=not options.get("progress", True))
    for backbone, dataset, protocol, seed in bar:
        rid = run_id(backbone, dataset.name, protocol, seed)
        bar.set_postfix_str(rid[:60])
        if rid in done:
            continue
        data = _with_seed(dataset.data, seed)
        if protocol in ("knn", "fewshot") and data.task == "multilabel":
            raise ConfigError(f"{dataset.name} is multi-label: the {protocol} protocol is single-label only.")
        if protocol == "linear_probe":
            row = _linear_probe(backbone, data, seed, image_size, options)
        elif protocol == "knn":
            row = _knn(backbone, data, image_size, options)
        elif protocol == "fewshot":
            row = _fewshot(backbone, data, seed, image_size, options)
        else:
            row = _fine_tune(backbone, data, seed, image_size, protocol, options)
        if backbone.name not in costs:
            costs[backbone.name] = backbone_cost(backbone.name, image_size or 224)
        params, gmacs = costs[backbone.name]
        row |= {"run": rid, "backbone": backbone.display, "architecture": backbone.name}
        row |= {"weights": backbone.weights, "dataset": dataset.name, "protocol": protocol, "seed": seed}
        row |= {"params_m": f"{params:.2f}", "gmacs": f"{gmacs:.3f}"}
        _append(results, row)
    return results
