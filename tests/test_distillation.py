"""Knowledge distillation: the loss against a hand computation, a teacher of another architecture and
preprocessing seeing the student's own (mixed) views, the teacher outside the student's checkpoint, and the
refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import CLASSES, TINY_BACKBONE, tiny_data, tiny_model, write_folder
from vision_transfer.errors import ConfigError
from vision_transfer.evaluation.kinds import task_kind
from vision_transfer.losses.distillation import Teacher
from vision_transfer.tasks import ImageClassifier

TEACHER_SIZE = 48  # not the student's 32 px
TEACHER_CONFIG = {"input_size": (3, TEACHER_SIZE, TEACHER_SIZE), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                  "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip


SINGLE, MULTI = task_kind("multiclass"), task_kind("multilabel")


def test_kd_loss_is_hintons_term_scaled_by_t_squared() -> None:
    """Each task kind's distillation term against a numpy computation."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)) * 3
    temperature = 2.5

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    expected = temperature**2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()
    got = SINGLE.distillation_loss(torch.tensor(s), torch.tensor(t), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    q_t, q_s = 1 / (1 + np.exp(-t / temperature)), 1 / (1 + np.exp(-s / temperature))
    bce = -(q_t * np.log(q_s) + (1 - q_t) * np.log(1 - q_s)).mean()
    assert float(MULTI.distillation_loss(torch.tensor(s), torch.tensor(t), temperature)) == pytest.approx(
        temperature**2 * bce, rel=1e-5
    )
    assert float(SINGLE.distillation_loss(torch.tensor(t), torch.tensor(t), temperature)) == pytest.approx(0, abs=1e-6)


def test_feature_kd_is_the_similarity_preserving_term_for_any_feature_sizes() -> None:
    """Tung & Mori's term against numpy: Gram matrices of each model's features (4 images; 6 and 9 features),
    rows L2-normalised, squared Frobenius distance over b^2; zero for features that differ only by a rotation
    and a scale (the same similarities), positive otherwise."""
    from vision_transfer.losses.distillation import similarity_distillation

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 9))

    def gram(x: np.ndarray) -> np.ndarray:
        g = x @ x.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(s) - gram(t)) ** 2).sum() / 16
    assert float(similarity_distillation(torch.tensor(s), torch.tensor(t))) == pytest.approx(expected, rel=1e-5)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    same = similarity_distillation(torch.tensor(s), torch.tensor(3 * s @ rotation))
    assert expected > 0.01 and float(same) == pytest.approx(0, abs=1e-10)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher of another family (test_resnet), input size (48 px) and normalisation, random weights."""
    torch.manual_seed(1)
    model = ImageClassifier(backbone="test_resnet", weights="none", class_names=list(CLASSES),
                            data_config=TEACHER_CONFIG)  # fmt: skip
    return model.save_standalone_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.ckpt")


def test_the_teacher_sees_the_students_view_in_its_own_preprocessing(teacher_checkpoint: Path) -> None:
    """Student-normalised 32 px views -> the teacher's logits of the same pixels resized to 48 px and
    normalised with its own mean and std (computed here independently)."""
    from vision_transfer.export import load_classifier

    teacher = Teacher(teacher_checkpoint, list(CLASSES), SINGLE)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    student = ImageClassifier(backbone=TINY_BACKBONE, weights="none", image_size=32, class_names=list(CLASSES))
    views = student.preprocess(pixels)
    got = teacher.logits(views, student.normalize.mean.flatten() / 255, student.normalize.std.flatten() / 255)
    resized = torch.nn.functional.interpolate(pixels.float() / 255, size=(48, 48), mode="bilinear", antialias=True)
    reference = load_classifier(teacher_checkpoint)
    with torch.no_grad():
        expected = reference((resized.clamp(0, 1) - 0.5) / 0.25)  # TEACHER_CONFIG's mean and std
    assert got.shape == (3, len(CLASSES)) and torch.allclose(got, expected, atol=1e-4)


def test_a_student_distils_from_its_teacher_which_sees_the_mixed_view_and_stays_out_of_the_checkpoint(
    teacher_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With and without feature distillation (the teacher, test_resnet, has other feature sizes): each term
    changes the training loss, and the teacher saw exactly the (mixed) views the student trained on."""
    root = write_folder(tmp_path / "images")
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    forward, outputs = ImageClassifier.forward_features, Teacher.outputs

    def student_features(self: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            seen["student"].append(images.detach().clone())
        return forward(self, images)

    def teacher_outputs(self: Teacher, views: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen["teacher"].append(views.detach().clone())
        return outputs(self, views, *args)

    monkeypatch.setattr(ImageClassifier, "forward_features", student_features)
    monkeypatch.setattr(Teacher, "outputs", teacher_outputs)
    losses = {}
    distil = {"teacher": str(teacher_checkpoint), "kd_alpha": 0.7, "kd_temperature": 3.0}
    for name, options in (("plain", {}), ("distilled", distil), ("features", {**distil, "kd_feature_weight": 5.0})):
        pl.seed_everything(0, verbose=False)
        data = tiny_data(root)
        model = tiny_model(data, mixup_alpha=0.4, **options)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        seen = {"student": [], "teacher": []}
        trainer.fit(model, datamodule=data)
        losses[name] = float(trainer.callback_metrics["train/loss"])
        metrics = trainer.callback_metrics
        assert ("train/kd_loss" in metrics) == bool(options)
        assert ("train/kd_feature_loss" in metrics) == (name == "features")
        if options:
            # the training views: the teacher got exactly the (mixed) images the student trained on
            assert len(seen["teacher"]) == 2 and all(
                torch.equal(a, b) for a, b in zip(seen["student"], seen["teacher"], strict=True))  # fmt: skip
            path = model.save_standalone_checkpoint(tmp_path / f"{name}.ckpt", datamodule=data)
    assert losses["plain"] != losses["distilled"]
    # 0.7 * the same Hinton term + 5 * the feature term (at the last step: weights moved the same way before it)
    kd_feature = float(metrics["train/kd_feature_loss"])
    assert kd_feature > 0 and losses["features"] != pytest.approx(losses["distilled"], abs=1e-4)
    content = torch.load(path, weights_only=True)
    assert not [k for k in content["state_dict"] if "teacher" in k]  # only its path is kept
    student_keys = set(tiny_model(tiny_data(root)).state_dict())
    assert set(content["state_dict"]) == student_keys
    from vision_transfer.checkpoint import read_checkpoint

    assert read_checkpoint(path)[0].settings["teacher"] == str(teacher_checkpoint)


def test_distillation_refusals(teacher_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kd_alpha=0.9 \(acts only with teacher\)"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", kd_alpha=0.9)
    with pytest.raises(ConfigError, match="cache_features=True never loads"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", mode="linear_probe", cache_features=True,
                        teacher=str(teacher_checkpoint))  # fmt: skip
    with pytest.raises(ConfigError, match=r"kd_feature_weight=1.0 \(acts only with teacher\)"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", kd_feature_weight=1.0)
    with pytest.raises(ConfigError, match=r"kd_feature_weight=1.0 \(acts only with a mode that trains the backbone"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", mode="linear_probe", teacher="t.ckpt",
                        kd_feature_weight=1.0)  # fmt: skip
    with pytest.raises(ConfigError, match=r"kd_feature_weight=-1.0: the feature term's weight"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", teacher="t.ckpt", kd_feature_weight=-1.0)
    with pytest.raises(ConfigError, match=r"kd_alpha=0: the distillation term's weight"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", teacher="t.ckpt", kd_alpha=0)
    with pytest.raises(ConfigError, match="distillation needs the same classes"):
        Teacher(teacher_checkpoint, ["a", "b", "c"], SINGLE)
    with pytest.raises(ConfigError, match=r"teacher='missing\.ckpt'"):
        Teacher("missing.ckpt", list(CLASSES), SINGLE)


def test_the_readme_command_distils_from_a_checkpoint(
    teacher_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fit --model.teacher CKPT --model.kd_cache true`` from the command line (the README's command, on fixed
    views): the teacher is loaded and announced, its outputs kept in the cache folder, and the run ends with a
    checkpoint that records the teacher's path."""
    from tests.conftest import tiny_fit_args
    from tests.test_cli import run_cli
    from vision_transfer.checkpoint import read_checkpoint

    root = write_folder(tmp_path / "images")
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={root}"]
    args = tiny_fit_args(data, tmp_path, "--test_after_fit=false", f"--model.teacher={teacher_checkpoint}",
                         "--model.kd_temperature=4", "--model.kd_cache=true", "--data.init_args.augment=none",
                         f"--model.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert run_cli(args) == 0
    printed = capsys.readouterr().out
    announced = "distilling from teacher teacher.ckpt (test_resnet, 48x48): kd_alpha=0.5, kd_temperature=4.0"
    assert f"{announced}, kd_cache (kept in {tmp_path / 'cache' / 'teacher'}" in printed
    assert len(list((tmp_path / "cache" / "teacher").glob("*.safetensors"))) == 1
    best = next((tmp_path / "runs").rglob("best.ckpt"))
    settings = read_checkpoint(best)[0].settings
    assert settings["teacher"] == str(teacher_checkpoint) and settings["kd_temperature"] == 4


@pytest.mark.parametrize("feature_weight", [0.0, 5.0], ids=["logits", "logits+features"])
def test_kd_cache_runs_the_teacher_once_per_image_and_trains_as_without_it(
    teacher_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, feature_weight: float
) -> None:
    """Fixed views (augment none), 18 training images, 3 epochs: without kd_cache the teacher sees 54 views,
    with it 18 (the first epoch) and the student ends as without it. A second run reads the kept outputs and
    never runs the teacher; another teacher gets its own file; an unreadable file is computed again."""
    root = write_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    seen: list[int] = []
    outputs = Teacher.outputs

    def counting(self: Teacher, views: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(len(views))
        return outputs(self, views, *args)

    monkeypatch.setattr(Teacher, "outputs", counting)

    def fit(teacher: Path, **options: object) -> tuple[ImageClassifier, int]:
        pl.seed_everything(0, verbose=False)
        data = tiny_data(root, augment="none", batch_size=6)
        model = tiny_model(data, teacher=str(teacher), kd_alpha=0.7, kd_feature_weight=feature_weight, **options)
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        seen.clear()
        trainer.fit(model, datamodule=data)
        assert len(data.splits["train"]) == 18
        return model, sum(seen)

    plain, plain_views = fit(teacher_checkpoint)
    cached, cached_views = fit(teacher_checkpoint, kd_cache=True, cache_dir=str(cache))
    assert plain_views == 54 and cached_views == 18
    assert cached._memo is not None and (cached._memo.hits, cached._memo.misses) == (36, 18)
    for key, value in plain.state_dict().items():
        assert torch.allclose(value.float(), cached.state_dict()[key].float(), atol=1e-6), key
    (kept,) = (cache / "teacher").glob("*.safetensors")
    again, again_views = fit(teacher_checkpoint, kd_cache=True, cache_dir=str(cache))
    assert again_views == 0 and again._memo is not None and again._memo.hits == 54
    assert torch.equal(again.head.weight, cached.head.weight)
    torch.manual_seed(2)
    other = ImageClassifier(backbone="test_resnet", weights="none", class_names=list(CLASSES),
                            data_config=TEACHER_CONFIG).save_standalone_checkpoint(tmp_path / "other.ckpt")  # fmt: skip
    assert fit(other, kd_cache=True, cache_dir=str(cache))[1] == 18
    assert len(list((cache / "teacher").glob("*.safetensors"))) == 2
    kept.write_bytes(b"not a safetensors file")
    assert fit(teacher_checkpoint, kd_cache=True, cache_dir=str(cache))[1] == 18
    assert fit(teacher_checkpoint, kd_cache=True, cache_dir=str(cache))[1] == 0  # written again


class _NewViews(torch.utils.data.Dataset):
    """Random images, new at every access: views that are never the same twice."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), index % len(CLASSES)


def test_kd_cache_refuses_views_that_change(teacher_checkpoint: Path, tmp_path: Path) -> None:
    """Without a teacher, with mixing, with an augmenting datamodule, and (caught while training) with a
    loader whose views are new every epoch: each refused, naming kd_cache."""
    with pytest.raises(ConfigError, match=r"kd_cache=True \(acts only with teacher\)"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", kd_cache=True)
    with pytest.raises(ConfigError, match="kd_cache reuses the teacher's outputs of fixed views; mixup_alpha"):
        ImageClassifier(backbone=TINY_BACKBONE, weights="none", teacher="t.ckpt", kd_cache=True, mixup_alpha=0.2)
    root = write_folder(tmp_path / "images")
    trainer_options = {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                       "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip
    data = tiny_data(root, augment="light")
    model = tiny_model(data, teacher=str(teacher_checkpoint), kd_cache=True)
    with pytest.raises(ConfigError, match=r"kd_cache: the datamodule augments \(augment='light'\)"):
        pl.Trainer(**trainer_options).fit(model, datamodule=data)
    model = ImageClassifier(backbone=TINY_BACKBONE, weights="none", image_size=32, class_names=list(CLASSES),
                            teacher=str(teacher_checkpoint), kd_cache=True)  # fmt: skip
    loader = torch.utils.data.DataLoader(_NewViews(), batch_size=4)
    with pytest.raises(ConfigError, match="kd_cache: 12 different training views in this run, more than the 8"):
        pl.Trainer(**trainer_options, limit_val_batches=0).fit(model, train_dataloaders=loader)
