"""int8 ONNX export: ONNX Runtime static quantization calibrated on images, gated by the validation score.

Swept over the timm families whose quantized operators differ (conv + BN, depthwise + squeeze-excite,
LayerNorm convnets, attention) and over the graph the export writes (plain, or with test-time augmentation
and a temperature inside): the int8 model tracks the fp32 one, is several times smaller, and a model that
loses more than the tolerance is refused without touching the fp32 exports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vision_transfer.errors import ConfigError, ExportError
from vision_transfer.export.exporter import classifier_from_pretrained, export_classifier
from vision_transfer.export.quantize import INT8_FILE, RECIPES, int8_export, onnx_outputs, validation_score

FAMILIES = ("test_resnet", "test_efficientnet", "test_convnext", "test_vit")


def _exported(arch: str, folder: Path, tta: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``arch`` (random weights) exported as ONNX into ``folder``; random images and the fp32 model's own
    predictions as their labels (so the fp32 score is 100 by construction)."""
    torch.manual_seed(0)
    classifier = classifier_from_pretrained(arch, "none")
    if tta:
        classifier.prediction = {**classifier.prediction, "temperature": 1.7}
    export_classifier(classifier, folder, ["onnx"], tta=tta)
    size = classifier.data_config.input_size[1]
    images = np.random.default_rng(0).normal(size=(48, 3, size, size)).astype(np.float32)
    logits, _ = onnx_outputs(folder / "classifier.onnx", [(images, np.zeros(len(images)))])
    return images, logits


@pytest.mark.parametrize(("arch", "tta"), [*((a, None) for a in FAMILIES), ("test_efficientnet", "flip")])
def test_int8_tracks_fp32_and_is_smaller_on_every_family(arch: str, tta: str | None, tmp_path: Path) -> None:
    """The fastest recipe that keeps the tolerance is written (a tiny ViT's LayerNorm/softmax quantized
    collapses it: the gate falls back to the weighted operators only)."""
    folder = tmp_path / arch
    images, logits = _exported(arch, folder, tta)
    labels = logits.argmax(1)
    # random tiny models have near-tied logits: 15 points of agreement with fp32 is the tolerance here
    report = int8_export(folder, [images[:24]], [(images, labels)], max_drop=15)
    assert report["val_fp32"] == 100 and report["validation_images"] == len(images)
    assert [t["recipe"] for t in report["tried"]] == list(RECIPES[: len(report["tried"])])
    assert report["recipe"] == report["tried"][-1]["recipe"] and report["drop_points"] <= 15
    if arch == "test_vit":  # measured: "all" and "sensitive_fp32" agree on 0% of the images
        assert report["recipe"] == "weighted_only" and report["tried"][0]["drop_points"] > 50
    assert report["size_mb"] < report["fp32_size_mb"] / 2  # int8 weights; measured 2.4-4x on these tiny models
    int8, _ = onnx_outputs(folder / INT8_FILE, [(images, labels)])
    assert np.abs(int8 - logits).mean() < 0.1 * logits.std()  # measured 0.01-0.045 of the logits' spread
    assert report["drop_points"] == pytest.approx(100 - validation_score(int8, labels)[1], abs=1e-3)


def test_an_int8_model_beyond_the_tolerance_is_refused_and_the_fp32_files_stay(tmp_path: Path) -> None:
    """The gate itself (the same for every architecture): calibrated on blank images every recipe loses points;
    nothing is written, the error names each recipe's score; ``allow_drop`` writes the last one tried."""
    folder = tmp_path / "test_resnet"
    images, logits = _exported("test_resnet", folder)
    labels = logits.argmax(1)
    fp32 = (folder / "classifier.onnx").read_bytes()
    with pytest.raises(
        ExportError, match=r"int8 all [\d.]+; sensitive_fp32 [\d.]+; weighted_only [\d.]+: every recipe"
    ):
        int8_export(folder, [np.zeros_like(images[:4])], [(images, labels)], max_drop=0)  # calibrated on blanks
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "classifier.onnx", "export_report.json"]
    assert (folder / "classifier.onnx").read_bytes() == fp32  # no partial file, the fp32 export untouched
    forced = int8_export(folder, [np.zeros_like(images[:4])], [(images, labels)], max_drop=0, allow_drop=True,
                         recipes=("all",))  # fmt: skip
    assert forced["drop_points"] > 0 and forced["allowed_drop"] and (folder / INT8_FILE).is_file()


def test_the_gate_scores_top1_or_map_in_points() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.5], [0.0, 2.0]])
    assert validation_score(logits, np.array([0, 1, 1, 1])) == ("top-1", 75.0)
    multi = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])  # ranked perfectly by the logits, per class
    assert validation_score(logits, multi) == ("mAP", pytest.approx(100.0))


def test_int8_needs_the_fp32_onnx_and_a_sane_tolerance(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="starts from the fp32 ONNX export"):
        int8_export(tmp_path, [], [], max_drop=1)
    with pytest.raises(ConfigError, match="--max_int8_drop -1"):
        int8_export(tmp_path, [], [], max_drop=-1)
