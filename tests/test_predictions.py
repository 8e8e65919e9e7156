"""Better predictions for the same compute: augmentation presets, mixup/cutmix, EMA, TTA, temperature calibration."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_fit_args
from tests.test_cli import run_cli
from vision_transfer.backbones import DataConfig
from vision_transfer.data.mixing import BatchMixer
from vision_transfer.data.transforms import create_train_transform
from vision_transfer.evaluation import expected_calibration_error as calibration_error
from vision_transfer.evaluation import task_kind
from vision_transfer.inference import PredictionHead, fit_temperature, tta_views


@pytest.mark.parametrize("preset", ["light", "medium", "strong"])
def test_augmentation_presets_are_seeded_and_keep_the_input_size(preset: str) -> None:
    config = DataConfig((3, 48, 48), (0.5,) * 3, (0.5,) * 3)
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)  # the torchvision half draws from torch (seeded per DataLoader worker)
        transform = create_train_transform(config, preset=preset)
        transform.set_random_seed(0)
        outputs.append(transform(image=image)["image"])
    assert outputs[0].shape == (3, 48, 48) and outputs[0].dtype == torch.uint8
    assert torch.equal(outputs[0], outputs[1])


def test_mixup_blends_images_and_one_hot_targets_with_the_same_ratio() -> None:
    mixer = BatchMixer(4, mixup_alpha=1.0, label_smoothing=0.0)
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, targets = mixer(images.clone(), labels)
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    # timm mixes the batch with its mirror: x * lam + x.flip(0) * (1 - lam); recover lam from the images
    lam = float(((mixed - images.flip(0)) / (images - images.flip(0))).median())
    assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam), atol=1e-5)
    assert torch.allclose(targets, one_hot * lam + one_hot.flip(0) * (1 - lam), atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(6))


def test_cutmix_targets_follow_the_pasted_area() -> None:
    mixer = BatchMixer(3, cutmix_alpha=1.0, label_smoothing=0.0)
    images = torch.zeros(4, 1, 10, 10)
    images[:2] = 1.0  # the mirror of image 0 is image 3 (zeros): the pasted box is where image 0 became 0
    mixed, targets = mixer(images.clone(), torch.tensor([0, 0, 1, 1]))
    kept = float(mixed[0].mean())  # lam: the share of image 0 left
    assert targets[0, 0] == pytest.approx(kept, abs=1e-6) and targets[0, 1] == pytest.approx(1 - kept, abs=1e-6)
    # odd batches are mixed too (tests/test_trust.py sweeps the sizes): the middle one meets itself
    _, odd_targets = mixer(torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2]))
    assert odd_targets[1, 1] == 1 and not torch.equal(odd_targets, torch.eye(3))


class FlipInvariant(nn.Module):
    """Logits from a 1x1 convolution and global average pooling: the same for an image and its mirror."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


SINGLE = task_kind("multiclass")


def test_tta_flip_of_a_flip_invariant_model_changes_nothing() -> None:
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    model = FlipInvariant().eval()
    plain = PredictionHead(model, SINGLE).probabilities(images)
    flipped = PredictionHead(model, SINGLE, tta="flip").probabilities(images)
    assert torch.allclose(plain, flipped, atol=1e-6)
    assert len(tta_views(images, "flip_zoom")) == 4
    sensitive = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5)).eval()  # not flip-invariant: TTA acts
    assert not torch.allclose(
        PredictionHead(sensitive, SINGLE).probabilities(images),
        PredictionHead(sensitive, SINGLE, tta="flip").probabilities(images),
    )
    manual = torch.stack([sensitive(v).softmax(1) for v in (images, images.flip(-1))]).mean(0)
    assert torch.allclose(PredictionHead(sensitive, SINGLE, tta="flip").probabilities(images), manual, atol=1e-6)


def test_temperature_fitting_recovers_a_known_miscalibration() -> None:
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 6, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)  # calibrated by construction
    overconfident = true_logits * 2.5
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(2.5, rel=0.05)
    before = calibration_error(overconfident.softmax(1), labels)
    after = calibration_error((overconfident / temperature).softmax(1), labels)
    assert after < before / 3


def test_fit_calibrates_on_val_and_the_checkpoint_export_and_predict_use_the_temperature(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_transfer import load_classifier
    from vision_transfer.export import export_checkpoint

    monkeypatch.chdir(tmp_path)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    extra = ["--data.init_args.val_fraction=0.3", "--trainer.max_epochs=2", "--model.tta=flip"]
    assert run_cli(tiny_fit_args(data, tmp_path, *extra)) == 0
    run = next((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    facts = json.loads((run / "run.json").read_text())
    calibration = facts["calibration"]
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-6 and (run / "reliability.png").is_file()
    assert "test/tta/acc" in facts["test"] and "test/ece" in facts["test"]  # TTA gain visible beside the plain score
    best = run / "checkpoints" / "best.ckpt"
    temperature = float(torch.load(best, weights_only=True)["state_dict"]["temperature"])
    assert temperature == pytest.approx(calibration["temperature"]) and temperature != 1.0

    classifier = load_classifier(best)
    images = sorted(str(p) for p in (image_folder / "circle").glob("*.png"))
    report = export_checkpoint(best, tmp_path / "exported", tta="flip")
    assert max(report["max_abs_diff"].values()) <= report["tolerance"]  # TorchScript/ONNX = PyTorch, TTA inside
    config = json.loads((tmp_path / "exported" / "config.json").read_text())["vision_transfer"]["prediction"]
    assert config["temperature"] == pytest.approx(temperature) and config["tta"] == "flip"
    scripted = torch.jit.load(str(tmp_path / "exported" / "classifier.torchscript.pt"))
    batch = classifier.preprocess(images)
    expected = classifier.prediction_head("flip").probabilities(batch)
    assert torch.allclose(scripted(batch).softmax(1), expected, atol=1e-5)
    top = classifier.predict(images, top_k=1, tta="flip")
    assert [p for ((_, p),) in top] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)

    output = tmp_path / "predictions.csv"
    predict = ["predict", f"--ckpt_path={best}", f"--data.init_args.predict_paths={image_folder / 'circle'}"]
    assert run_cli([*predict, f"--prediction.output={output}", "--prediction.top_k=1"]) == 0
    with output.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label_1", "calibrated_prob_1"]  # the header says the probabilities are calibrated
    assert [float(r["calibrated_prob_1"]) for r in rows] == pytest.approx(expected.max(1).values.tolist(), abs=1e-4)


def test_calibrate_command_on_a_checkpoint(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = tiny_fit_args(
        data, tmp_path, "--model.calibrate=false", "--test_after_fit=false", "--data.init_args.val_fraction=0.3"
    )
    assert run_cli(args) == 0
    best = next((tmp_path / "runs").rglob("best.ckpt"))
    assert float(torch.load(best, weights_only=True)["state_dict"]["temperature"]) == 1.0
    capsys.readouterr()
    assert run_cli(["calibrate", str(best), f"--output={tmp_path / 'calibration'}"]) == 0
    assert capsys.readouterr().out.startswith("calibrated on val: temperature ")
    assert float(torch.load(best, weights_only=True)["state_dict"]["temperature"]) != 1.0
    assert (tmp_path / "calibration" / "reliability.png").is_file()


def test_ema_decay_is_a_model_option(tmp_path: Path, image_folder: Path) -> None:
    from pytorch_lightning.callbacks import EMAWeightAveraging

    from vision_transfer.tasks import ImageClassifier

    model = ImageClassifier(TINY_BACKBONE, weights="none", image_size=TINY_SIZE, ema_decay=0.9)
    assert [type(c) for c in model.configure_callbacks() if isinstance(c, EMAWeightAveraging)] == [EMAWeightAveraging]
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    assert run_cli(tiny_fit_args(data, tmp_path, "--model.ema_decay=0.9", "--test_after_fit=false")) == 0


def test_mixup_trains_from_the_cli_and_is_refused_with_cached_features(tmp_path: Path, image_folder: Path) -> None:
    from vision_transfer.errors import ConfigError
    from vision_transfer.tasks import ImageClassifier

    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    mix = ["--model.mixup_alpha=0.2", "--model.cutmix_alpha=1.0", "--data.init_args.augment=medium"]
    assert run_cli(tiny_fit_args(data, tmp_path, *mix, "--test_after_fit=false")) == 0
    with pytest.raises(ConfigError, match="cannot be used with cache_features"):
        ImageClassifier(TINY_BACKBONE, weights="none", mode="linear_probe", cache_features=True, mixup_alpha=0.2)
