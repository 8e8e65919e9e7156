"""Extract, then evaluate on a datamodule: ``vision-transfer extract`` and ``probe``, and the grid's protocols."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from vision_transfer.datamodules import ImageDataModule
from vision_transfer.errors import ConfigError
from vision_transfer.evaluation.kinds import SINGLE
from vision_transfer.evaluation.linear import DEFAULT_LRS, DEFAULT_WDS, KORNBLITH_C_GRID, ProbeResult, Solver
from vision_transfer.features.cache import FeatureCache
from vision_transfer.features.extract import Precision, extract, feature_spec, resolve_precision

if TYPE_CHECKING:
    from vision_transfer.evaluation.fewshot import FewShotResult
    from vision_transfer.evaluation.knn import KnnResult


def extract_datamodule(
    datamodule: ImageDataModule,
    backbone: str,
    weights: str | None = "auto",
    *,
    image_size: int | None = None,
    cache_dir: str | None = None,
    dtype: Literal["float16", "float32"] = "float16",
    precision: Precision = "auto",
    batch_size: int = 256,
    num_workers: int | None = None,
    compile: bool = False,
    progress: bool = True,
) -> tuple[dict[str, FeatureCache], int]:
    """Features of every split of ``datamodule``; returns the caches (one per split) and the
    backbone forward passes run. ``num_workers`` None uses the datamodule's DataLoader workers."""
    datamodule.check_for_extraction()
    splits = datamodule.prepare_splits()
    caches, extractor = extract(
        backbone,
        weights,
        splits,
        image_size=image_size,
        cache_root=cache_dir,
        dtype=dtype,
        precision=precision,
        batch_size=batch_size,
        num_workers=datamodule.num_workers if num_workers is None else num_workers,
        compile=compile,
        progress=progress,
    )
    return caches, extractor.forward_passes if extractor else 0


def package_versions() -> dict[str, str]:
    """The versions of the packages that compute a result: recorded beside it."""
    import timm

    import vision_transfer

    return {"torch_version": torch.__version__, "timm_version": timm.__version__,
            "vision_transfer_version": vision_transfer.__version__}  # fmt: skip


def extraction_settings(
    backbone: str,
    weights: str | None = "auto",
    *,
    image_size: int | None = None,
    dtype: Literal["float16", "float32"] = "float16",
    precision: Precision = "auto",
    **_: Any,
) -> dict[str, Any]:
    """What :func:`extract_datamodule` makes features with, resolved as it resolves them (the input
    size, the weights' identity, dtype and autocast), and the package versions."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # extract()'s own choice
    spec = feature_spec(
        backbone, weights, image_size=image_size, dtype=dtype, precision=resolve_precision(precision, device)
    ).to_dict()
    return {"input_size": spec["data_config"]["input_size"][-1], "weights": spec["weights"], "dtype": dtype,
            "precision": spec["precision"], **package_versions()}  # fmt: skip


def split_arrays(
    caches: dict[str, FeatureCache], datamodule: ImageDataModule
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of each split: features from the cache, labels from the data as it is now."""
    return {name: (cache.load(), datamodule.splits[name].labels) for name, cache in caches.items()}


def linear_probe(
    caches: dict[str, FeatureCache],
    datamodule: ImageDataModule,
    solver: Solver = "sgd",
    *,
    epochs: int = 10,
    lrs: Sequence[float] | None = None,
    wds: Sequence[float] | None = None,
    c_grid_size: int = len(KORNBLITH_C_GRID),
    seed: int = 0,
    class_weight: Literal["balanced"] | None = None,
) -> tuple[ProbeResult, dict[str, Any]]:
    """The linear probe on a datamodule's cached features: what ``probe`` and the benchmark grid both run.

    ``sgd`` on a single-label split without class weights streams minibatches from the memory-mapped
    shards (``evaluation.stream.stream_sgd_probe``, never loading a split); otherwise the split is
    loaded (``evaluation.linear.run_probe``), and ``lbfgs`` (full-batch) first checks that it fits in
    memory, naming ``--solver sgd`` when it does not.

    Returns:
        the result and the solver's options as used.
    """
    from vision_transfer.evaluation.linear import run_probe  # looked up at call time: tests wrap it

    classes = len(datamodule.class_names or [])
    torch.manual_seed(seed)
    options: dict[str, Any] = (
        {"lrs": tuple(lrs or DEFAULT_LRS), "wds": tuple(wds or DEFAULT_WDS), "epochs": epochs, "seed": seed}
        if solver == "sgd"
        else {"c_grid": tuple(float(c) for c in np.logspace(-6, 5, c_grid_size))}
    )
    from vision_transfer.evaluation.stream import STREAMED_TASKS, stream_sgd_probe

    if solver == "sgd" and class_weight is None and datamodule.task in STREAMED_TASKS:
        splits = {name: shard_inputs(caches, datamodule, name)[:2] for name in caches}
        return stream_sgd_probe(splits["train"], splits["val"], splits.get("test"), classes, **options), options
    if solver == "lbfgs":
        from vision_transfer.evaluation.stream import require_fits_in_memory

        rows = len(datamodule.splits["train"]) + len(datamodule.splits["val"])
        require_fits_in_memory(rows, caches["train"].dim, num_classes=classes)
    data = split_arrays(caches, datamodule)
    test = data.get("test")
    return run_probe(data["train"], data["val"], test, classes, solver, class_weight=class_weight, **options), options


def probe_datamodule(
    datamodule: ImageDataModule,
    backbone: str,
    weights: str | None = "auto",
    *,
    output: str | Path = "runs/probe",
    solver: Solver = "sgd",
    epochs: int = 10,
    lrs: list[float] | None = None,
    wds: list[float] | None = None,
    c_grid_size: int = len(KORNBLITH_C_GRID),
    seed: int = 0,
    class_weight: Literal["balanced"] | None = None,
    **extract_options: Any,
) -> tuple[ProbeResult, Path]:
    """Linear probe on cached features (:func:`linear_probe`); writes ``probe.json`` and a ``probe.ckpt``
    for ``predict``."""
    caches, forward_passes = extract_datamodule(datamodule, backbone, weights, **extract_options)
    class_names = list(datamodule.class_names or [])
    result, options = linear_probe(
        caches, datamodule, solver, epochs=epochs, lrs=lrs, wds=wds, c_grid_size=c_grid_size, seed=seed,
        class_weight=class_weight,
    )  # fmt: skip

    from vision_transfer.tasks import ImageClassifier  # Lightning only for the checkpoint

    counts = [float(c) for c in datamodule.splits["train"].class_counts(len(class_names))]
    model = ImageClassifier(
        backbone, weights=weights, mode="linear_probe", class_names=class_names,
        image_size=extract_options.get("image_size"), task=datamodule.task_kind.name, class_counts=counts,
    )  # fmt: skip
    with torch.no_grad():
        model.head.weight.copy_(result.weight)  # type: ignore[operator]
        model.head.bias.copy_(result.bias)  # type: ignore[operator]
        # the prediction settings (temperature or per-class thresholds) on val, as fit does
        from vision_transfer.app.calibrate import calibrate_model

        features, labels = split_arrays({"val": caches["val"]}, datamodule)["val"]
        logits = torch.from_numpy(features) @ result.weight.T + result.bias
        calibration = calibrate_model(model, logits, torch.from_numpy(labels))
    folder = Path(output)
    checkpoint = model.save_standalone_checkpoint(folder / "probe.ckpt", datamodule)
    report = {
        **result.summary(),
        "backbone": backbone,
        "weights": model.weights_source,
        "class_names": class_names,
        "caches": {name: str(cache.folder) for name, cache in caches.items()},
        "forward_passes": forward_passes,
        "extraction_seconds": {
            name: (cache.manifest() or {}).get("extraction_seconds") for name, cache in caches.items()
        },
        "feature_dim": caches["train"].dim,
        "calibration": {k: v for k, v in calibration.items() if not k.startswith("reliability")},
        "checkpoint": str(checkpoint.resolve()),
        "settings": extraction_settings(backbone, weights, **extract_options)
        | {"solver": solver, "class_weight": class_weight}
        | (
            {"epochs": epochs, "lrs": list(options["lrs"]), "wds": list(options["wds"]), "seed": seed}
            if solver == "sgd"
            else {"c_grid_size": c_grid_size}
        ),
    }
    (folder / "probe.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return result, checkpoint


def shard_inputs(
    caches: dict[str, FeatureCache], datamodule: ImageDataModule, split: str
) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """(memory-mapped shards, labels, sample ids) of a split: what k-NN, few-shot and the streamed
    probe read, without loading the split into RAM."""
    samples = datamodule.splits[split]
    return caches[split].shards(), samples.labels, list(samples.ids)


def require_single_label(datamodule: ImageDataModule, protocol: str, name: str | None = None) -> None:
    """Refuse multi-label data for a single-label protocol (k-NN votes, few-shot shots per class).

    Args:
        datamodule: the data (its splits are read if they are not yet).
        protocol: the protocol's name, as the user gave it.
        name: the data's name in the message; default the datamodule's own description.
    """
    if datamodule.task != SINGLE:
        raise ConfigError(
            f"{name or datamodule.describe()} is multi-label: the {protocol} protocol is single-label only."
        )


def knn_datamodule(
    datamodule: ImageDataModule,
    backbone: str,
    weights: str | None = "auto",
    *,
    ks: tuple[int, ...] | None = None,
    temperature: float | None = None,
    **extract_options: Any,
) -> KnnResult:
    """DINO's weighted k-NN on cached features: k chosen on val, test scored once
    (:mod:`vision_transfer.evaluation.knn`)."""
    from vision_transfer.evaluation.knn import DINO_TEMPERATURE, KNN_KS, knn_evaluate

    require_single_label(datamodule, "knn")
    caches, _ = extract_datamodule(datamodule, backbone, weights, **extract_options)
    train, val, test = (shard_inputs(caches, datamodule, s)[:2] for s in ("train", "val", "test"))
    classes = len(datamodule.class_names or [])
    return knn_evaluate(train, val, test, classes, ks=ks or KNN_KS, temperature=temperature or DINO_TEMPERATURE)


def fewshot_datamodule(
    datamodule: ImageDataModule,
    backbone: str,
    weights: str | None = "auto",
    *,
    shots: int = 5,
    episodes: int = 20,
    seed: int = 0,
    **extract_options: Any,
) -> FewShotResult:
    """Few-shot linear probes: ``episodes`` draws of ``shots`` per class from train only, C chosen by
    cross-validation inside the shots, each episode scored on test (see :mod:`vision_transfer.evaluation.fewshot`)."""
    from vision_transfer.evaluation.fewshot import few_shot

    require_single_label(datamodule, "fewshot")
    caches, _ = extract_datamodule(datamodule, backbone, weights, **extract_options)
    train = shard_inputs(caches, datamodule, "train")
    test = shard_inputs(caches, datamodule, "test")[:2]
    return few_shot(train, test, len(datamodule.class_names or []), shots=shots, episodes=episodes, seed=seed)
