"""Fit a checkpoint's prediction settings on its validation split: what ``fit`` runs after training
and ``vision-transfer calibrate`` runs on any checkpoint.

Single-label: one temperature (NLL, L-BFGS), with NLL and ECE before and after and a reliability
diagram. Multi-label: per-class thresholds maximising F1 (no temperature: a per-class
temperature would not change which labels are predicted once thresholds are tuned). The values
are written into the checkpoint (atomically), from where ``test``, ``predict``, ``load_classifier``
and ``export`` take them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from vision_transfer.app.checkpoints import model_from_checkpoint, recorded_datamodule
from vision_transfer.checkpoint import read_checkpoint, save_checkpoint, set_prediction
from vision_transfer.data.dataset import as_model_batch
from vision_transfer.datamodules import CachedFeatureDataModule, ImageDataModule
from vision_transfer.errors import CheckpointError, DataError
from vision_transfer.evaluation.kinds import task_kind
from vision_transfer.files import write_atomic
from vision_transfer.inference.outputs import tta_views
from vision_transfer.tasks import ImageClassifier


@torch.no_grad()  # not inference_mode: the logits then feed an autograd fit
def collect_logits(model: ImageClassifier, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits and labels of every batch of ``loader`` (the model in eval mode). With test-time
    augmentation, ``(views, N, C)``: one row of logits per view, as predictions average them."""
    model.eval().to(device)
    tta = model.hparams.get("tta", "none")
    logits, labels = [], []
    for loaded in loader:
        batch = as_model_batch(loaded)
        # an ImageBatch's views (``tta``); a FeatureBatch's one plain head output
        views = batch.to(device).prepared(model).view_logits(model, lambda images: tta_views(images, tta))
        out = torch.stack(views)
        labels.append(batch.labels)
        logits.append(out.float().cpu())
    return torch.cat(logits, dim=1).squeeze(0), torch.cat(labels)


def calibrate_model(model: ImageClassifier, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Fit the model's prediction settings (its task kind's: a temperature, or per-class thresholds) from
    validation logits, on the probabilities predictions use (after any post-hoc logit shift; ``(views, N, C)``
    logits: their test-time augmentation average); returns the report."""
    shifted = logits if (shift := model.logit_shift()) is None else logits + shift
    fitted, report = model.task_kind.calibrate(shifted, labels, model.class_names or [])
    for name, value in fitted.items():
        getattr(model, name).copy_(value)
    return {**report, "tta": model.hparams.get("tta", "none")}


def calibration_line(report: dict[str, Any]) -> str:
    """The one line ``fit`` and ``calibrate`` print about what calibration did."""
    return task_kind(report["task"]).calibration_line(report)


def calibrate_checkpoint(
    path: str | Path,
    datamodule: ImageDataModule | CachedFeatureDataModule | None = None,
    output: str | Path | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Calibrate the checkpoint at ``path`` on ``datamodule``'s validation split (default: the
    datamodule the checkpoint records) and write the result into it; a reliability diagram (and
    the numbers, in ``calibration.json``) go to ``output`` (default: the checkpoint's run folder).
    A given datamodule must have the checkpoint's classes and preprocessing (the one ``fit`` trained on has);
    one given without preprocessing is built again with the checkpoint's."""
    path = Path(path)
    entry, content = read_checkpoint(path)
    model = model_from_checkpoint(entry, content)
    if datamodule is None:
        images = recorded_datamodule(entry)
    else:
        images = datamodule.images if isinstance(datamodule, CachedFeatureDataModule) else datamodule
        if images.data_config is None:
            images = images.with_options(data_config=model.data_config)
    for what, ours, theirs in (
        ("classes", images.class_names, model.class_names),
        ("preprocessing", images.data_config, model.data_config),
    ):
        if ours != theirs:
            raise CheckpointError(f"{path}: {what} {theirs}, the datamodule's {ours}; calibrate on data that matches.")
    # features extracted by this model's backbone (the weights the checkpoint holds)
    datamodule = CachedFeatureDataModule(images, model) if model.hparams.get("cache_features") else images
    datamodule.setup("validate")
    if "val" not in datamodule.splits:
        raise DataError(f"{path}: calibration needs a validation split, and this data has none.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = datamodule.val_dataloader()
    if isinstance(datamodule, CachedFeatureDataModule) and model.hparams.get("tta", "none") != "none":
        loader = datamodule.images.val_dataloader()  # predictions average views of images, not cached features
    logits, labels = collect_logits(model, loader, device)
    report = calibrate_model(model.cpu(), logits, labels)
    for name in ("temperature", "thresholds"):
        content["state_dict"][name] = getattr(model, name).detach().cpu().clone()
    calibration = {k: v for k, v in report.items() if not k.startswith("reliability")}
    set_prediction(content, model.prediction_settings(), calibration)
    save_checkpoint(content, path)
    folder = (
        Path(output)
        if output is not None
        else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    )
    _write_report(folder, report)
    return report


def _write_report(folder: Path, report: dict[str, Any]) -> None:
    import json

    from vision_transfer.report.plots import plot_reliability
    from vision_transfer.report.run import update_run_facts

    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=float) + "\n"
    write_atomic(folder / "calibration.json", io.BytesIO(text.encode()).getbuffer(), "calibration report")
    if "reliability_before" in report:
        plot_reliability(report["reliability_before"], report["reliability_after"], folder / "reliability.png")
    if (folder / "run.json").is_file():
        update_run_facts(folder, calibration={k: v for k, v in report.items() if not k.startswith("reliability")})
