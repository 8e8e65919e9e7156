"""int8 exports: ONNX Runtime static quantization and torch.ao (TorchScript), calibrated on images and gated by
the validation score.

Swept over the timm families whose quantized operators differ (conv + BN, depthwise + squeeze-excite, TensorFlow
"same" padding with fused norm + activation layers, LayerNorm convnets, attention) and over the graph the export
writes (plain, or with test-time augmentation and a temperature inside), for both runtimes: the int8 model tracks
the fp32 one, is several times smaller, and a model that loses more than the tolerance is refused without touching
the fp32 exports.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vision_transfer.errors import ConfigError, ExportError
from vision_transfer.export.exporter import classifier_from_pretrained, export_classifier
from vision_transfer.export.loading import Classifier
from vision_transfer.export.quantize import INT8_FILE, int8_export, onnx_outputs, quantize_onnx, validation_score
from vision_transfer.export.quantize_torch import (
    TORCH_INT8_FILE,
    linear_share,
    torch_int8_export,
    torch_recipes,
    torchscript_outputs,
)

# tf_efficientnet_lite0 (TensorFlow "same" padding) is prepared exactly (test below) and quantized end to end on
# its real weights by the deploy script's test; random weights scale its activations unlike any trained model's
FAMILIES = ("test_resnet", "test_efficientnet", "test_convnext", "test_vit")


def _exported(arch: str, folder: Path, tta: str | None = None, formats: tuple[str, ...] = ()) -> Any:
    """``arch`` (random weights) with a 3-class head that separates three kinds of image (noise with one colour
    channel brighter), exported in ``formats`` into ``folder``; the images, the fp32 model's logits and the
    classifier.

    The head is the nearest-class-mean rule on the backbone's features, scaled to a margin of a few logits:
    a trained model's regime. timm's random 1000-class heads gave logits a thousandth apart: their int8 top-1
    agreement moved between fresh installs (a tiny EfficientNet's from over 85% to 0-69%)."""
    torch.manual_seed(0)
    pretrained = classifier_from_pretrained(arch, "none")
    size = pretrained.data_config.input_size[1]
    kinds = np.arange(48) % 3
    images = np.random.default_rng(0).normal(size=(48, 3, size, size)).astype(np.float32)
    images[np.arange(48), kinds] += 1.0
    with torch.no_grad():
        features = pretrained.backbone(torch.from_numpy(images))
        centre = features.mean(0)
        means = torch.stack([features[torch.from_numpy(kinds == k)].mean(0) for k in range(3)]) - centre
        scale = 2.0 / float((features - centre).std() * means.norm(dim=1).mean())
        head = torch.nn.Linear(features.shape[1], 3).requires_grad_(False)
        head.weight.copy_(means * scale)
        head.bias.copy_(-(centre @ means.T) * scale)
    classifier = Classifier(arch, pretrained.backbone, head, pretrained.data_config, ["red", "green", "blue"])
    if tta:
        classifier.prediction = {**classifier.prediction, "temperature": 1.7}
    export_classifier(classifier, folder, ["onnx", *formats], tta=tta)
    logits, _ = onnx_outputs(folder / "classifier.onnx", [(images, np.zeros(len(images)))])
    assert (logits.argmax(1) == kinds).mean() > 0.9  # the fp32 model does tell the kinds apart
    return images, logits, classifier


@pytest.mark.parametrize(("arch", "tta"), [*((a, None) for a in FAMILIES), ("test_efficientnet", "flip")])
def test_int8_tracks_fp32_and_is_smaller_on_every_family(arch: str, tta: str | None, tmp_path: Path) -> None:
    """Under the default tolerance (1 point) the fastest recipe of each runtime (ONNX: every operator in int8;
    PyTorch: static for convolutional networks, dynamic for transformers) agrees with fp32."""
    folder = tmp_path / arch
    images, logits, classifier = _exported(arch, folder, tta, ("torchscript",))
    labels = logits.argmax(1)
    onnx_report = int8_export(folder, [images[:24]], [(images, labels)])
    torch_report = torch_int8_export(folder, classifier, [images[:24]], [(images, labels)], tta=tta)
    recipes = torch_recipes(classifier)
    # linear layers hold most weights of a ViT and of a ConvNeXt (its channel MLPs)
    assert recipes == (("dynamic", "static") if arch in ("test_vit", "test_convnext") else ("static",))
    for report, file, outputs, first in ((onnx_report, INT8_FILE, onnx_outputs, "all"),
                                         (torch_report, TORCH_INT8_FILE, torchscript_outputs, recipes[0])):  # fmt: skip
        assert report["val_fp32"] == 100 and report["validation_images"] == len(images)
        assert report["recipe"] == first and report["drop_points"] <= 1, report
        # int8 weights (tiny models carry many scales); dynamic: the linear layers' alone, 40% of their bytes
        shrink = 0.6 if report["recipe"] != "dynamic" else 1 - 0.4 * linear_share(classifier)
        assert report["size_mb"] < shrink * report["fp32_size_mb"], (report["size_mb"], report["fp32_size_mb"])
        int8, _ = outputs(folder / file, [(images, labels)])
        # with TTA the graph returns log-probabilities: a uint8 softmax (before its tail stayed fp32) sent every one
        # under 1/510 to the log's clamp, 5.3 logits off on average (here: 0.5 std)
        assert np.abs(int8 - logits).mean() < 0.3 * logits.std(), file
        assert report["drop_points"] == pytest.approx(100 - validation_score(int8, labels)[1], abs=1e-3)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "test_efficientnet", "test_resnet"])
def test_static_int8_prepares_the_model_without_changing_its_outputs(arch: str) -> None:
    """Before torch.fx traces it, timm's fused norm + activation layers are split (so batch norm folds into the
    convolution) and TensorFlow "same" padding becomes fixed padding at the input size: the fp32 outputs do not
    move, and none of those layers is left."""
    from timm.layers import BatchNormAct2d
    from timm.layers.conv2d_same import Conv2dSame

    from vision_transfer.export.quantize_torch import _fix_same_padding, _split_norm_act

    torch.manual_seed(0)
    model = classifier_from_pretrained(arch, "none")
    for m in model.modules():  # random running statistics: a batch norm that is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 80)
    prepared = copy.deepcopy(model)
    _split_norm_act(prepared)
    _fix_same_padding(prepared, images[:1])
    with torch.no_grad():
        torch.testing.assert_close(prepared.eval()(images), model(images), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, (BatchNormAct2d, Conv2dSame)) for m in prepared.modules())
    if arch == "tf_efficientnet_lite0":  # the one of these with dynamic padding
        assert any(isinstance(m, Conv2dSame) for m in model.modules())


def test_same_padding_in_numbers_changes_no_output_even_or_odd() -> None:
    """``Conv2d(padding="same")`` (convmixer's; torch.ao's int8 convolution refuses the string): even kernels
    pad one pixel more after than before, as torch does."""
    from vision_transfer.export.quantize_torch import _fix_same_padding

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding="same"), torch.nn.Conv2d(4, 4, (4, 3), padding="same"),
                                torch.nn.Conv2d(4, 2, 2, padding="same", dilation=2)).eval()  # fmt: skip
    images = torch.randn(2, 3, 9, 11)
    prepared = copy.deepcopy(model)
    _fix_same_padding(prepared, images[:1])
    with torch.no_grad():
        torch.testing.assert_close(prepared(images), model(images))
    assert not any(getattr(m, "padding", None) == "same" for m in prepared.modules())


def test_the_torch_gate_records_a_recipe_that_cannot_quantize_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model torch.fx cannot trace is refused by name for ``static`` (not a silent fp32 file); the gate tries
    the next recipe, and with none left says why, writing nothing."""
    import vision_transfer.export.quantize_torch as quantize_torch

    folder = tmp_path / "test_resnet"
    images, logits, classifier = _exported("test_resnet", folder, formats=("torchscript",))
    real = quantize_torch.quantize_torch

    def untraceable(model: Any, calibration: Any, size: Any, recipe: str = "static") -> Any:
        if recipe == "static":
            raise ExportError("int8 PyTorch static: torch.fx cannot trace the model (TraceError: for the test)")
        return real(model, calibration, size, recipe)

    batches = [(images, logits.argmax(1))]
    with monkeypatch.context() as patch:  # a PyTorch without the engine (e.g. an ARM build): named, with a way out
        patch.setattr(quantize_torch, "ENGINE", "no_such_engine")
        with pytest.raises(ExportError, match=r"lacks the no_such_engine quantized engine.*--formats without torch"):
            torch_int8_export(folder, classifier, [images[:24]], batches)
    monkeypatch.setattr(quantize_torch, "quantize_torch", untraceable)
    with pytest.raises(ExportError, match=r"no recipe could quantize the model: static: int8 PyTorch static: torch"):
        torch_int8_export(folder, classifier, [images[:24]], batches)
    assert not (folder / TORCH_INT8_FILE).exists()
    report = torch_int8_export(folder, classifier, [images[:24]], batches, recipes=("static", "dynamic"))
    assert [t["recipe"] for t in report["tried"]] == ["static", "dynamic"] and "refused" in report["tried"][0]
    assert report["recipe"] == "dynamic" and (folder / TORCH_INT8_FILE).is_file()


def test_a_refusal_names_an_error_without_a_message() -> None:
    """torch.ao fails with bare ``assert`` statements too: the refusal still names the error (it raised an
    IndexError of its own before)."""
    from vision_transfer.export.quantize_torch import _refused

    assert str(_refused("static: torch.ao cannot quantize the model", AssertionError())) == (
        "int8 PyTorch static: torch.ao cannot quantize the model (AssertionError)")  # fmt: skip
    assert str(_refused("dynamic: x", RuntimeError("first\nsecond"))) == "int8 PyTorch dynamic: x (RuntimeError: first)"


def test_a_torch_int8_model_beyond_the_tolerance_is_refused_and_the_fp32_file_stays(tmp_path: Path) -> None:
    """The accuracy gate for the PyTorch file: calibrated on blank images, static int8 loses points; nothing is
    written, the fp32 TorchScript file is untouched, and the error gives both scores."""
    folder = tmp_path / "test_resnet"
    images, logits, classifier = _exported("test_resnet", folder, formats=("torchscript",))
    fp32 = (folder / "classifier.torchscript.pt").read_bytes()
    with pytest.raises(ExportError, match=r"validation top-1 fp32 100.00, int8 static [\d.]+: every recipe drops"):
        torch_int8_export(folder, classifier, [np.zeros_like(images[:4])], [(images, logits.argmax(1))], max_drop=0)
    assert not (folder / TORCH_INT8_FILE).exists() and not list(folder.glob("*.partial"))
    assert (folder / "classifier.torchscript.pt").read_bytes() == fp32


def test_the_gate_tries_the_recipes_in_turn_and_writes_the_first_within_the_tolerance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe that loses too much is passed over for the next, and the report lists each one tried."""
    import vision_transfer.export.quantize as quantize

    folder = tmp_path / "test_resnet"
    images, logits, _ = _exported("test_resnet", folder)
    real = quantize.quantize_onnx

    def first_recipe_broken(source: Path, target: Path, calibration: list[np.ndarray], recipe: str, *rest: Any) -> Path:
        blank = [np.zeros_like(batch) for batch in calibration] if recipe.startswith("all") else calibration
        return real(source, target, blank, recipe, *rest)

    monkeypatch.setattr(quantize, "quantize_onnx", first_recipe_broken)
    report = int8_export(folder, [images[:24]], [(images, logits.argmax(1))])
    assert [t["recipe"] for t in report["tried"]] == ["all", "all_7bit", "sensitive_fp32"]
    assert all(t["drop_points"] > 1 for t in report["tried"][:2]) and report["recipe"] == "sensitive_fp32"
    assert report["drop_points"] <= 1 and (folder / INT8_FILE).is_file()


def test_an_int8_model_beyond_the_tolerance_is_refused_and_the_fp32_files_stay(tmp_path: Path) -> None:
    """The gate itself (the same for every architecture): calibrated on blank images every recipe loses points;
    nothing is written, the error names each recipe's score; ``allow_drop`` writes the last one tried."""
    folder = tmp_path / "test_resnet"
    images, logits, _ = _exported("test_resnet", folder)
    labels = logits.argmax(1)
    fp32 = (folder / "classifier.onnx").read_bytes()
    with pytest.raises(
        ExportError,
        match=r"int8 all [\d.]+; all_7bit [\d.]+; sensitive_fp32 [\d.]+; weighted_only [\d.]+: every recipe",
    ):
        int8_export(folder, [np.zeros_like(images[:4])], [(images, labels)], max_drop=0)  # calibrated on blanks
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "classifier.onnx", "export_report.json"]
    assert (folder / "classifier.onnx").read_bytes() == fp32  # no partial file, the fp32 export untouched
    forced = int8_export(folder, [np.zeros_like(images[:4])], [(images, labels)], max_drop=0, allow_drop=True,
                         recipes=("all",))  # fmt: skip
    assert forced["drop_points"] > 0 and forced["allowed_drop"] and (folder / INT8_FILE).is_file()


def test_the_7bit_recipe_writes_7bit_weights_and_the_others_8bit(tmp_path: Path) -> None:
    """all_7bit reaches ONNX Runtime as reduce_range: every int8 weight within [-64, 64] (no uint8 x int8
    product can saturate a 16-bit sum without VNNI); the other recipes use the full int8 range."""
    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "test_resnet"
    images, _, _ = _exported("test_resnet", folder)
    for recipe in ("all", "all_7bit"):
        quantize_onnx(folder / "classifier.onnx", folder / f"{recipe}.onnx", [images[:24]], recipe)
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(folder / f"{recipe}.onnx")).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and t.dims and np.prod(t.dims) > 64]  # fmt: skip
        largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
        assert weights and (largest <= 64 if recipe == "all_7bit" else largest == 127), (recipe, largest)


def test_the_gate_scores_top1_or_map_in_points() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.5], [0.0, 2.0]])
    assert validation_score(logits, np.array([0, 1, 1, 1])) == ("top-1", 75.0)
    multi = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])  # ranked perfectly by the logits, per class
    assert validation_score(logits, multi) == ("mAP", pytest.approx(100.0))


def test_int8_needs_the_fp32_file_and_a_sane_tolerance(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="starts from the fp32 ONNX export"):
        int8_export(tmp_path, [], [], max_drop=1)
    with pytest.raises(ConfigError, match="--max_int8_drop -1"):
        int8_export(tmp_path, [], [], max_drop=-1)
    with pytest.raises(ExportError, match="starts from the fp32 TorchScript export"):
        torch_int8_export(tmp_path, None, [], [], max_drop=1)
