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
from vision_transfer.app.connect import connect
from vision_transfer.checkpoint import read_checkpoint, save_checkpoint, set_prediction
from vision_transfer.data.dataset import FeatureBatch
from vision_transfer.datamodules import CachedFeatureDataModule, ImageDataModule
from vision_transfer.errors import DataError
from vision_transfer.evaluation.metrics import expected_calibration_error, f1_micro, reliability
from vision_transfer.files import write_atomic
from vision_transfer.inference.calibration import fit_temperature, nll, view_log_probs
from vision_transfer.inference.outputs import tta_views
from vision_transfer.inference.thresholds import best_f1_thresholds
from vision_transfer.tasks import ImageClassifier


@torch.no_grad()  # not inference_mode: the logits then feed an autograd fit
def collect_logits(model: ImageClassifier, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits and labels of every batch of ``loader`` (the model in eval mode). With test-time
    augmentation, ``(views, N, C)``: one row of logits per view, as predictions average them."""
    model.eval().to(device)
    tta = model.hparams.get("tta", "none")
    logits, labels = [], []
    for batch in loader:
        if isinstance(batch, FeatureBatch):
            out = model.forward_head(batch.features.to(device).float())[None]
        else:
            images = model.preprocess(batch[0].to(device))
            out = torch.stack([model(view) for view in tta_views(images, tta)])
        logits.append(out.float().cpu())
        labels.append(batch[1])
    return torch.cat(logits, dim=1).squeeze(0), torch.cat(labels)


def calibrate_model(model: ImageClassifier, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Fit the temperature (multiclass) or thresholds (multilabel) from validation logits into ``model``,
    on the probabilities predictions use (``(views, N, C)`` logits: their test-time augmentation average)."""
    if model.multilabel:
        probs = logits.sigmoid().mean(0) if logits.ndim == 3 else logits.sigmoid()
        thresholds, no_positive = best_f1_thresholds(probs, labels)
        model.thresholds.copy_(thresholds)
        return {
            "thresholds": [round(float(t), 4) for t in thresholds],
            "classes_without_val_positive": [model.class_names[c] for c in no_positive] if model.class_names else [],
            "f1_micro_at_0.5": f1_micro(probs >= 0.5, labels),
            "f1_micro_tuned": f1_micro(probs >= thresholds, labels),
        }
    shifted = logits if (shift := model.logit_shift()) is None else logits + shift
    temperature = fit_temperature(shifted, labels)
    model.temperature.fill_(temperature)
    before, after = view_log_probs(shifted).exp(), view_log_probs(shifted, temperature).exp()
    return {
        "temperature": temperature,
        "tta": model.hparams.get("tta", "none"),
        "nll_before": nll(shifted, labels),
        "nll_after": nll(shifted, labels, temperature),
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "reliability_before": reliability(before, labels),
        "reliability_after": reliability(after, labels),
    }


def calibration_line(report: dict[str, Any]) -> str:
    """The one line ``fit`` and ``calibrate`` print about what calibration did."""
    if "temperature" in report:
        return (
            f"calibrated on val: temperature {report['temperature']:.3f}, NLL {report['nll_before']:.4f} -> "
            f"{report['nll_after']:.4f}, ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}"
        )
    return (
        f"per-class thresholds tuned on val: micro-F1 {report['f1_micro_at_0.5']:.4f} at 0.5 -> "
        f"{report['f1_micro_tuned']:.4f}"
    )


def calibrate_checkpoint(
    path: str | Path,
    datamodule: ImageDataModule | CachedFeatureDataModule | None = None,
    output: str | Path | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Calibrate the checkpoint at ``path`` on ``datamodule``'s validation split (default: the
    datamodule the checkpoint records) and write the result into it; a reliability diagram (and
    the numbers, in ``calibration.json``) go to ``output`` (default: the checkpoint's run folder)."""
    path = Path(path)
    entry, content = read_checkpoint(path)
    model = model_from_checkpoint(entry, content)
    if datamodule is None:
        datamodule = recorded_datamodule(entry)
    datamodule = connect(model, datamodule)
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
