"""Export round trips: timm alone, load_backbone/load_classifier, TorchScript and ONNX agree."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tests.conftest import TINY_BACKBONE, TINY_SIZE
from tests.test_cli import run_cli
from vision_transfer import create_backbone
from vision_transfer.errors import UnsafeCheckpointError
from vision_transfer.export import export_checkpoint, load_backbone, load_classifier
from vision_transfer.export.exporter import TOLERANCE, classifier_from_pretrained, export_classifier

PLAIN_TIMM = """
import importlib.util, sys
# hide the project (an editable install adds a meta-path finder): only timm and torch remain
sys.meta_path[:] = [f for f in sys.meta_path if "vision_transfer" not in repr(f)]
sys.path[:] = [p for p in sys.path if "vision_transfer" not in p and p not in ("", ".")]
assert importlib.util.find_spec("vision_transfer") is None
import torch, timm
folder, arch, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
x = torch.load(out + ".in.pt")
a = timm.create_model("local-dir:" + folder, pretrained=True).eval()
b = timm.create_model(arch, pretrained=True, num_classes=n,
                      pretrained_cfg_overlay=dict(file=folder + "/model.safetensors", num_classes=n)).eval()
with torch.no_grad():
    torch.save({"a": a(x), "b": b(x)}, out)
"""


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classifier fine-tuned for a few steps through the real CLI."""
    from tests.conftest import tiny_fit_args, write_folder

    root = tmp_path_factory.mktemp("export")
    folder = write_folder(root / "images")
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={folder}"]
    assert run_cli(tiny_fit_args(data, root, "--test_after_fit=false")) == 0
    return next((root / "runs").rglob("best.ckpt"))


def _plain_timm(folder: Path, arch: str, n: int, x: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "plain.pt"
    torch.save(x, str(out) + ".in.pt")
    # A subprocess whose path does not include the project: only timm and torch are importable.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_TIMM, str(folder), arch, str(n), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(out, weights_only=True)


def test_round_trip_timm_alone_load_backbone_and_onnx(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    report = export_checkpoint(trained_checkpoint, out)
    assert set(report["files"]) == {"timm", "torchscript", "onnx", "card"}
    assert all(d <= TOLERANCE for d in report["max_abs_diff"].values())
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == TINY_BACKBONE and config["label_names"] == ["circle", "square", "stripes"]
    assert config["pretrained_cfg"]["input_size"] == [3, TINY_SIZE, TINY_SIZE]
    assert config["vision_transfer"]["provenance"]["initial_weights"]["kind"] == "none"

    classifier = load_classifier(trained_checkpoint)
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        reference = classifier(x)
        features = classifier.backbone(x)
    plain = _plain_timm(out, TINY_BACKBONE, 3, x, tmp_path)
    assert torch.allclose(plain["a"], reference, atol=1e-5) and torch.allclose(plain["b"], reference, atol=1e-5)

    backbone, data_config = load_backbone(out)
    with torch.no_grad():
        assert torch.allclose(backbone(x), features, atol=1e-5)
    assert data_config == classifier.data_config

    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(["logits"], {"images": x.numpy()})[0]  # another batch size than exported
    assert np.allclose(onnx_logits, reference.numpy(), atol=TOLERANCE)
    scripted = torch.jit.load(str(out / "classifier.torchscript.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), reference, atol=TOLERANCE)


def test_export_command_and_predict_on_any_input(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli_export"
    assert run_cli(["export", str(trained_checkpoint), "--to", str(out), "--formats", "timm"]) == 0
    classifier = load_classifier(out)
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    by_path, by_pil, by_array = classifier.predict([tmp_path / "x.png", Image.fromarray(image), image], top_k=2)
    assert by_path == by_pil == by_array
    assert len(by_path) == 2 and by_path[0][0] in {"circle", "square", "stripes"} and by_path[0][1] >= by_path[1][1]


def test_int8_export_from_the_cli_calibrates_on_train_and_reports_val_before_and_after(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--quantize int8`` writes an int8 model per runtime in ``--formats`` (ONNX, TorchScript; the fp32 ONNX
    added when neither is asked for), calibrates on the checkpoint's own training images, scores each against
    its fp32 file on the whole val split and says so, in the report, the output and the model card, whose
    TorchScript block then runs the int8 file; it refuses what it cannot do in one line."""
    from vision_transfer.app.checkpoints import recorded_datamodule
    from vision_transfer.checkpoint import read_checkpoint
    from vision_transfer.export.card import IMAGE_PLACEHOLDER
    from vision_transfer.export.quantize import INT8_FILE
    from vision_transfer.export.quantize_torch import TORCH_INT8_FILE

    val = len(recorded_datamodule(read_checkpoint(trained_checkpoint)[0]).prepare_splits()["val"])
    both = {"int8": INT8_FILE, "int8_torchscript": TORCH_INT8_FILE}
    for formats, files in (("timm", {"int8": INT8_FILE}), ("timm,torchscript,onnx", both)):
        out = tmp_path / formats.replace(",", "_")
        args = ["export", str(trained_checkpoint), "--to", str(out), "--formats", formats, "--quantize", "int8"]
        assert run_cli([*args, "--calibration_images", "8"]) == 0
        report = json.loads((out / "export_report.json").read_text())
        printed, card = capsys.readouterr().out, (out / "README.md").read_text()
        assert report["files"]["onnx"] == "classifier.onnx" and {k: report["files"].get(k) for k in files} == files
        assert sorted(report["int8"]) == sorted(r for r in ("onnx", "torchscript") if r in formats or r == "onnx")
        for runtime, int8 in report["int8"].items():
            fp32 = out / ("classifier.onnx" if runtime == "onnx" else "classifier.torchscript.pt")
            assert int8["calibration_images"] == 8 and int8["validation_images"] == val and int8["metric"] == "top-1"
            assert (out / int8["file"]).stat().st_size < fp32.stat().st_size  # tiny: scales weigh
            assert int8["drop_points"] <= int8["max_drop"] == 1.0
            said = f"val top-1 {int8['val_int8']:.2f} vs fp32 {int8['val_fp32']:.2f}"
            assert f"{said}, calibrated on 8 training" in printed and f"`{int8['file']}`" in card and said in card
    (block,) = [b for b in _python_blocks(card) if "torch.jit.load" in b]
    assert f'torch.jit.load("{TORCH_INT8_FILE}")' in block
    assert 'torch.backends.quantized.engine = "onednn"' in block  # the weights are packed at load, for it
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(image)
    result = subprocess.run([sys.executable, "-c", block.replace(IMAGE_PLACEHOLDER, f"IMAGE = {str(image)!r}")],
                            capture_output=True, text=True, cwd=out)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() in load_classifier(out).class_names, result.stderr[-2000:]
    refused = tmp_path / "refused"
    for bad, said in (("--max_int8_drop=-1", "--max_int8_drop -1: a tolerance in points"),
                      ("--calibration_images=0", "--calibration_images 0: at least 1")):  # fmt: skip
        assert run_cli([*args[:3], str(refused), *args[4:], bad]) == 2
        assert said in capsys.readouterr().err and not refused.exists()  # refused before anything is written
    assert run_cli(["export", "--backbone", "test_resnet", "--to", str(tmp_path / "x"), "--quantize", "int8"]) == 2
    assert "--quantize int8 needs a checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_packaged_lite0_exported_and_reimported_still_sees_espresso(tmp_path: Path) -> None:
    report = export_classifier(
        classifier_from_pretrained("tf_efficientnet_lite0", "packaged"), tmp_path, ["timm", "onnx"]
    )
    assert report["max_abs_diff"]["onnx"] <= TOLERANCE
    classifier = load_classifier(tmp_path)
    assert classifier.predict(skdata.coffee(), top_k=1)[0][0][0] == "espresso"
    assert "cat" in classifier.predict(Image.fromarray(skdata.chelsea()), top_k=1)[0][0][0]
    backbone, config = load_backbone(tmp_path)
    assert backbone.num_features == 1280 and config.mean == (0.5, 0.5, 0.5)


def test_features_only_from_packaged_and_exported_weights(trained_checkpoint: Path, tmp_path: Path) -> None:
    maps, _ = create_backbone("tf_efficientnet_lite0", weights="packaged", features_only=True, out_indices=(2, 4))
    shapes = [tuple(f.shape) for f in maps(torch.randn(1, 3, 64, 64))]
    assert shapes == [(1, 40, 8, 8), (1, 320, 2, 2)]
    full, _ = create_backbone("tf_efficientnet_lite0", weights="packaged")
    assert torch.equal(maps.state_dict()["conv_stem.weight"], full.state_dict()["conv_stem.weight"])

    export_checkpoint(trained_checkpoint, tmp_path, ["timm"])
    tiny_maps, _ = create_backbone(TINY_BACKBONE, weights=str(tmp_path), features_only=True)
    backbone, _ = load_backbone(tmp_path)
    assert torch.equal(tiny_maps.state_dict()["conv_stem.weight"], backbone.state_dict()["conv_stem.weight"])


def test_loaders_are_top_level_and_do_not_import_lightning() -> None:
    code = (
        "import sys, vision_transfer as vt; "
        "assert vt.load_backbone and vt.load_classifier; "
        "assert 'pytorch_lightning' not in sys.modules, 'Lightning imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_crafted_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil(), "vision_transfer": {}}))
    for loader in (load_classifier, load_backbone):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt: refused"):
            loader(path)
    assert run_cli(["export", str(path), "--to", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "pwned").exists()


def _python_blocks(card: str) -> list[str]:
    return [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]


def test_every_export_has_a_model_card_whose_numbers_are_measured_and_whose_code_runs(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    """The card of a checkpoint export: Hub metadata, the class counts of every recorded split, val/test scores
    equal to the exported model's on those splits, and each code block run as a reader would (own process,
    from the folder, IMAGE set to a file)."""
    import yaml

    from vision_transfer.app.checkpoints import recorded_datamodule
    from vision_transfer.checkpoint import read_checkpoint
    from vision_transfer.export.card import IMAGE_PLACEHOLDER

    out = tmp_path / "card"
    assert run_cli(["export", str(trained_checkpoint), "--to", str(out)]) == 0
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["metrics"] == ["accuracy", "f1"] and meta["license"]
    assert json.loads((out / "export_report.json").read_text())["files"]["card"] == "README.md"
    splits = recorded_datamodule(read_checkpoint(trained_checkpoint)[0]).prepare_splits()
    classifier = load_classifier(out)
    for i, name in enumerate(classifier.class_names):  # the class table: images per class in each split
        counts = [int((splits[s].labels == i).sum()) for s in splits]
        assert f"| {name} | " + " | ".join(map(str, counts)) + " |" in card
    for split in ("val", "test"):
        probs = classifier.prediction_head().probabilities(
            torch.cat([classifier.preprocess([str(p)]) for p in splits[split].items])
        )
        top1 = float((probs.argmax(1).numpy() == splits[split].labels).mean())
        assert f"| {split} | {len(splits[split])} | {top1:.4f} | " in card
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(image)
    blocks = _python_blocks(card)
    assert len(blocks) == 5  # vision-transfer, timm, transformers, TorchScript, ONNX Runtime
    assert all(IMAGE_PLACEHOLDER in block for block in blocks)
    codes = [block.replace(IMAGE_PLACEHOLDER, f"IMAGE = {str(image)!r}") for block in blocks]
    # one process for all (an interpreter start and the imports each would cost ~5 s), each block in globals of
    # its own, as a reader's fresh script: nothing one defines or imports reaches the next
    runner = ("import contextlib, io, json, sys\nprinted = []\nfor code in json.loads(sys.argv[1]):\n"
              "    out = io.StringIO()\n    with contextlib.redirect_stdout(out):\n"
              "        exec(code, {'__name__': '__main__'})\n    printed.append(out.getvalue())\n"
              "print(json.dumps(printed))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", runner, json.dumps(codes)], capture_output=True, text=True,
                            cwd=out)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    top1 = []
    for block, printed in zip(blocks, json.loads(result.stdout.splitlines()[-1]), strict=True):
        named = {printed.find(name): name for name in classifier.class_names if name in printed}
        assert named, (block, printed)
        top1.append(named[min(named)])  # each block prints its top class first
    assert len(set(top1)) == 1, top1  # one model, one preprocessing: the same answer from every runtime


def test_a_card_without_training_data_says_so_and_runs(tmp_path: Path) -> None:
    """A pretrained backbone exported as it is: no data, no scores, no invented numbers; its ONNX block (the
    only format written) is self-contained."""
    out = tmp_path / "pretrained"
    assert run_cli(["export", "--backbone", "test_resnet", "--weights", "none", "--to", str(out),
                    "--formats", "onnx"]) == 0  # fmt: skip
    card = (out / "README.md").read_text()
    assert "No training data is recorded" in card and "## Evaluation" not in card and "metrics:" not in card
    (block,) = _python_blocks(card)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(image)
    code = block.replace('IMAGE = "path/to/image.jpg"', f"IMAGE = {str(image)!r}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=out)
    assert result.returncode == 0 and result.stdout.strip().isdigit(), result.stderr[-2000:]
