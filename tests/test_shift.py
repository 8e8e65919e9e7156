"""The shifted test set: seeded corruptions at three severities, the top-1 under them and benchmarks/shift.py."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tests.conftest import BENCHMARKS, CLASSES, TINY_BACKBONE, TINY_SIZE, TinyRun
from vision_transfer.data.dataset import FeatureBatch
from vision_transfer.data.shift import CORRUPTIONS, SEVERITIES, ShiftScores, corrupt, shift_scores
from vision_transfer.errors import ConfigError
from vision_transfer.evaluation.kinds import task_kind


def _images(n: int = 4) -> torch.Tensor:
    """Real photos at the tiny model's size, uint8 NCHW as the eval transform yields them (drawn shapes
    would not do: a circle or stripes can be further from themselves at 30 degrees than at 45)."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()][:n]
    arrays = [np.asarray(Image.fromarray(p).resize((TINY_SIZE, TINY_SIZE), Image.Resampling.BICUBIC)) for p in photos]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _mean_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def _tiny_checkpoint(run: TinyRun) -> tuple[Any, Any]:
    """The tiny run's trained model and its recorded test loader (no workers)."""
    from vision_transfer.app.checkpoints import model_from_checkpoint, recorded_datamodule
    from vision_transfer.checkpoint import read_checkpoint

    entry, content = read_checkpoint(run.best)
    data = recorded_datamodule(entry).with_options(num_workers=0)
    data.setup("test")
    return model_from_checkpoint(entry, content), data.test_dataloader()


# -- corrupt ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_each_severity_changes_every_image_and_moves_it_further_than_the_last(corruption: str) -> None:
    images = _images()
    changes = []
    for severity in SEVERITIES:
        out = corrupt(images, corruption, severity)
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert all((out[i] != images[i]).any() for i in range(len(images))), f"{corruption}/{severity}"
        changes.append(_mean_change(out, images))
    assert changes == sorted(changes) and len(set(changes)) == len(changes), (corruption, changes)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corruption_is_the_same_for_the_same_index_however_the_split_is_batched(corruption: str) -> None:
    images = _images()
    whole = corrupt(images, corruption, 3)
    assert torch.equal(whole, corrupt(images, corruption, 3))
    assert torch.equal(whole[2:], corrupt(images[2:], corruption, 3, first_index=2))
    assert torch.equal(images, _images())  # the input is left as it was


def test_a_different_index_draws_different_noise_and_rotations_go_both_ways() -> None:
    image = _images(1)
    noisy = [corrupt(image, "gaussian_noise", 2, first_index=i) for i in range(2)]
    assert not torch.equal(noisy[0], noisy[1])
    assert not torch.equal(corrupt(image, "gaussian_noise", 1), corrupt(image, "gaussian_noise", 2))
    turned = {corrupt(image, "rotation", 1, first_index=i).numpy().tobytes() for i in range(8)}
    assert len(turned) == 2  # one angle, a seeded sign


def test_unknown_corruption_or_severity_is_refused_naming_it_and_the_valid_ones() -> None:
    images = _images(1)
    with pytest.raises(ConfigError, match=r"'fog'.*gaussian_noise, gaussian_blur, contrast, rotation, jpeg"):
        corrupt(images, "fog", 1)
    with pytest.raises(ConfigError, match=r"severity 4 .*1, 2, 3"):
        corrupt(images, "jpeg", 4)
    with pytest.raises(ConfigError, match="uint8 NCHW"):
        corrupt(images.float(), "jpeg", 1)


# -- shift_scores --------------------------------------------------------------------------------
class PixelSumModel(torch.nn.Module):
    """Predicts class ``sum of pixels % 3``: a changed pixel changes its prediction two times in three, so
    its scores tell which pixels it was shown (the tiny trained model predicts one class for everything)."""

    task_kind = task_kind("multiclass")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images.double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(images.sum(dim=(1, 2, 3)).long() % 3, 3).float()

    def prediction_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * 2  # the temperature and logit shift act here; the argmax stays


def _pixel_sum_classes(images: torch.Tensor) -> torch.Tensor:
    return images.double().sum(dim=(1, 2, 3)).long() % 3


def test_shift_scores_score_each_copy_of_the_split_seeded_by_its_index_not_its_batch() -> None:
    images = torch.cat([_images()] * 6)  # 24 images, each photo 6 times: the same pixels, other seeds
    noisy = corrupt(images, "gaussian_noise", 2)  # the whole split at once, image i seeded by i
    labels = _pixel_sum_classes(noisy)  # every image right on this copy, and only on it
    loader = [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 24, 5)]  # batches of 5, 5, ..., 4
    scores = shift_scores(PixelSumModel(), loader, corruptions=("gaussian_noise", "jpeg"), severities=(1, 2))

    assert scores.per_severity["gaussian_noise/2"] == 1.0
    assert scores.id_top1 == pytest.approx(float((_pixel_sum_classes(images) == labels).double().mean()))
    jpeg = _pixel_sum_classes(corrupt(images, "jpeg", 1))
    assert scores.per_severity["jpeg/1"] == pytest.approx(float((jpeg == labels).double().mean()))
    assert max(scores.id_top1, scores.per_severity["gaussian_noise/1"], scores.per_severity["jpeg/1"]) < 0.7
    assert scores.n_images == 24
    assert set(scores.per_severity) == {"gaussian_noise/1", "gaussian_noise/2", "jpeg/1", "jpeg/2"}
    for corruption in ("gaussian_noise", "jpeg"):
        levels = [scores.per_severity[f"{corruption}/{s}"] for s in (1, 2)]
        assert scores.per_corruption[corruption] == pytest.approx(np.mean(levels))
    assert scores.corrupted_top1 == pytest.approx(np.mean(list(scores.per_severity.values())))
    assert ShiftScores(**scores.to_dict()) == scores


def test_shift_scores_of_a_checkpoint_on_clean_images_are_what_test_logged(tiny_run: TinyRun) -> None:
    model, loader = _tiny_checkpoint(tiny_run)
    scores = shift_scores(model, loader, corruptions=("rotation",), severities=(3,))
    batches = list(loader)
    images, labels = torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])
    with torch.no_grad():
        predicted = model(model.preprocess(images)).argmax(dim=1)
        # one batch of the whole split, seeded from index 0: the same pixels as the loader's batches of 8
        corrupted = model(model.preprocess(corrupt(images, "rotation", 3))).argmax(dim=1)
    assert scores.n_images == len(labels) == 9
    assert scores.id_top1 == pytest.approx(float((predicted == labels).float().mean()))
    assert scores.per_severity["rotation/3"] == pytest.approx(float((corrupted == labels).float().mean()))
    with (tiny_run.run_dir / "metrics.csv").open() as f:
        logged = [float(row["test/acc"]) for row in csv.DictReader(f) if row.get("test/acc")]
    assert scores.id_top1 == pytest.approx(logged[-1], abs=1e-6)


def test_shift_scores_refuses_multilabel_models_feature_loaders_and_unknown_names() -> None:
    from vision_transfer.tasks import ImageClassifier

    options: dict[str, Any] = {"backbone": TINY_BACKBONE, "weights": "none", "image_size": TINY_SIZE}
    multilabel = ImageClassifier(class_names=list(CLASSES), task="multilabel", **options)
    with pytest.raises(ConfigError, match="multi-label"):
        shift_scores(multilabel, [])
    model = ImageClassifier(class_names=list(CLASSES), task="multiclass", **options)
    with pytest.raises(ConfigError, match="cached features"):
        shift_scores(model, [FeatureBatch(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ConfigError, match="'snow'"):
        shift_scores(model, [], corruptions=("jpeg", "snow"))
    with pytest.raises(ConfigError, match="severity 0"):
        shift_scores(model, [], severities=(0,))


# -- benchmarks/shift.py -------------------------------------------------------------------------
def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shift_benchmark", BENCHMARKS / "shift.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_end_to_end_tiny(tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, examples = tmp_path / "shift.json", tmp_path / "examples.png"
    args = [str(tiny_run.best), "--out", str(out), "--examples", str(examples), "--threads", "1"]
    _script().main([*args, "--corruptions", "contrast", "jpeg", "--severities", "1", "3", "--max-test", "6"])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["n_images"] == 6 and results["backbone"] == TINY_BACKBONE
    assert set(results["per_severity"]) == {"contrast/1", "contrast/3", "jpeg/1", "jpeg/3"}
    assert results["severity_parameters"] == {"contrast": [0.4, 0.2, 0.1], "jpeg": [25, 15, 7]}
    assert "| test set | top-1 | severity 1 | severity 3 |" in printed
    assert f"| clean (ID) | {results['id_top1']:.4f} | | |" in printed
    assert f"| corrupted, mean of 4 | {results['corrupted_top1']:.4f} | | |" in printed
    jpeg = [results["per_corruption"]["jpeg"], results["per_severity"]["jpeg/1"], results["per_severity"]["jpeg/3"]]
    assert "| jpeg | {:.4f} | {:.4f} | {:.4f} |".format(*jpeg) in printed
    with Image.open(examples) as png:  # 2 rows (corruptions) x 3 columns (clean + 2 severities), 1.6 in at 120 dpi
        assert png.size == (576, 384)
