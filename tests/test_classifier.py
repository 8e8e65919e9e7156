"""ImageClassifier: what each mode trains, BatchNorm, optimizer groups, precision, checkpoints."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_model, write_folder
from vision_transfer.checkpoint import read_checkpoint
from vision_transfer.errors import CheckpointError
from vision_transfer.tasks import ImageClassifier
from vision_transfer.tuning.schedule import cosine_with_warmup


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = {
        "max_steps": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**options, **kwargs})


def _fit(tmp_path: Path, folder: Path, **model_kwargs) -> tuple[ImageClassifier, dict, dict]:
    """Train a few steps; return the model and its backbone's state before and after."""
    datamodule = tiny_data(folder)
    model = tiny_model(datamodule, lr=0.05, warmup_epochs=0, **model_kwargs)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _trainer(tmp_path).fit(model, datamodule)
    return model, before, model.backbone.state_dict()


def test_linear_probe_changes_nothing_in_the_backbone(tmp_path: Path, image_folder: Path) -> None:
    model, before, after = _fit(tmp_path, image_folder, mode="linear_probe")
    for key, value in after.items():
        assert torch.equal(value, before[key]), f"{key} moved in linear_probe mode"
    assert all(p.grad is None for p in model.backbone.parameters()), "a gradient was computed for the backbone"
    assert all(p.requires_grad for p in model.backbone.parameters())  # frozen by no_grad, not requires_grad
    assert model.head.weight.grad is not None


def test_full_mode_trains_weights_and_batchnorm_statistics(tmp_path: Path, image_folder: Path) -> None:
    _, before, after = _fit(tmp_path, image_folder, mode="full")
    weights = [k for k in after if k.endswith("weight")]
    stats = [k for k in after if k.endswith("running_mean")]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)
    assert sum(not torch.equal(after[k], before[k]) for k in weights) == len(weights)


def test_linear_probe_backbone_stays_in_eval_mode_after_train() -> None:
    model = ImageClassifier(TINY_BACKBONE, weights="none", mode="linear_probe", class_names=["a", "b"])
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    full = ImageClassifier(TINY_BACKBONE, weights="none", mode="full", class_names=["a", "b"]).train()
    assert all(m.training for m in full.backbone.modules() if isinstance(m, _BatchNorm))


def test_bn_frozen_keeps_every_batchnorm_in_eval_mode() -> None:
    model = ImageClassifier(TINY_BACKBONE, weights="none", mode="full", bn="frozen", class_names=["a", "b"]).train()
    norms = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert norms and not any(m.training for m in norms)


def test_optimizer_groups_have_absolute_learning_rates(tmp_path: Path, image_folder: Path) -> None:
    data = tiny_data(image_folder)
    model = tiny_model(data, lr=0.1, head_lr=1.0, layer_decay=0.5, weight_decay=0.05)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(model, data)
    groups = trainer.optimizers[0].param_groups
    lrs = {g["name"]: g["initial_lr"] for g in groups}  # before the schedule's multiplier
    top = len(model.policy.groups) - 1
    assert lrs["head"] == 1.0 and lrs[f"stage{top}"] == pytest.approx(0.1)
    assert lrs["stage0"] == pytest.approx(0.1 * 0.5**top)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("no_decay"))
    assert all(g["weight_decay"] == 0.05 for g in groups if not g["name"].endswith("no_decay"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_cosine_schedule_warms_up_then_decays() -> None:
    factor = cosine_with_warmup(warmup_steps=4, total_steps=20, min_ratio=0.1)
    values = [factor(s) for s in range(21)]
    assert values[0] < values[3] < values[4] == pytest.approx(1.0)
    assert values[12] == pytest.approx(0.55) and values[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))


def test_bf16_mixed_precision_trains_on_cpu(tmp_path: Path, image_folder: Path) -> None:
    datamodule = tiny_data(image_folder)
    model = tiny_model(datamodule, warmup_epochs=0)
    trainer = _trainer(tmp_path, precision="bf16-mixed", limit_val_batches=1.0)
    trainer.fit(model, datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["val/acc"] >= 0
    assert next(model.parameters()).dtype == torch.float32  # mixed: master weights stay fp32


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageClassifier, Path, Path]:
    """A tiny model trained 3 steps on a generated folder, its checkpoint and the folder (read-only)."""
    root = tmp_path_factory.mktemp("classifier_checkpoint")
    folder = write_folder(root / "images")
    torch.manual_seed(0)
    data = tiny_data(folder)
    model = tiny_model(data)
    trainer = _trainer(root)
    trainer.fit(model, data)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return model, path, folder


def test_checkpoint_keeps_classes_and_needs_no_weights_file(saved: tuple[ImageClassifier, Path, Path]) -> None:
    model, path, image_folder = saved
    entry, _ = read_checkpoint(path)
    assert entry.class_names == ["circle", "square", "stripes"]
    assert entry.datamodule is not None and entry.datamodule["init_args"]["root"] == str(image_folder)
    restored = ImageClassifier.load_from_checkpoint(path, weights_only=True)
    assert restored.class_names == model.class_names and restored.data_config.input_size == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(restored.eval()(x), model.eval()(x), atol=1e-6)


def test_checkpoint_with_other_classes_is_refused(saved: tuple[ImageClassifier, Path, Path]) -> None:
    other = ImageClassifier(TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=["cat", "dog"])
    with pytest.raises(CheckpointError, match=r"model\.ckpt: has 3 classes .* this model has 2"):
        batches = DataLoader(TensorDataset(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1).long()))
        pl.Trainer(logger=False, enable_progress_bar=False).validate(
            other, batches, ckpt_path=saved[1], weights_only=True
        )


def test_a_datamodule_with_other_preprocessing_than_the_checkpoint_is_refused_by_name(
    saved: tuple[ImageClassifier, Path, Path],
) -> None:
    """The data keeps the preprocessing it was built with; a checkpoint trained with another is refused, in one
    line naming the file and both configs (the datamodule would otherwise resize and crop as the other)."""
    from vision_transfer.backbones import preprocessing

    _, path, folder = saved
    data = tiny_data(folder, data_config=preprocessing(TINY_BACKBONE, "none", 40))
    model = tiny_model(data, image_size=40)
    with pytest.raises(CheckpointError) as error:
        pl.Trainer(logger=False, enable_progress_bar=False).validate(model, data, ckpt_path=path, weights_only=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: its preprocessing DataConfig(input_size=(3, 32, 32)")
    assert "differs from DataConfig(input_size=(3, 40, 40)" in message
    assert data.data_config.input_size == (3, 40, 40)  # nothing replaced it


def test_for_data_builds_the_model_whole_and_nothing_is_handed_over_later(tmp_path: Path) -> None:
    """The model takes the data's classes, task, class counts and preprocessing at construction; fitting
    changes none of them on either side (no late ``connect``)."""
    folder = write_folder(tmp_path / "images", per_class=6)
    for image in sorted((folder / "square").glob("*.png"))[2:]:
        image.unlink()  # uneven classes: the counts are the data's, not a default
    data = tiny_data(folder, val_fraction=0.2, test_fraction=0.2)
    config = data.data_config
    model = tiny_model(data, class_weighting="balanced", warmup_epochs=0)
    assert model.class_names == data.class_names == ["circle", "square", "stripes"]
    assert model.task == data.task == "multiclass" and model.data_config == config
    assert model.class_counts.tolist() == data.class_counts().tolist() == [4.0, 2.0, 4.0]
    built = (list(model.class_names), model.task, model.class_counts.tolist(), dict(data.hparams))
    _trainer(tmp_path, max_steps=2).fit(model, data)
    assert data.data_config is config
    assert (model.class_names, model.task, model.class_counts.tolist(), dict(data.hparams)) == built


def test_for_data_refuses_what_the_data_cannot_give(tmp_path: Path, image_folder: Path) -> None:
    from vision_transfer.datamodules import ImageFolderDataModule
    from vision_transfer.errors import ConfigError

    with pytest.raises(ConfigError, match="has no data_config: build it with data_config=preprocessing"):
        ImageClassifier.for_data(ImageFolderDataModule(str(image_folder)), backbone=TINY_BACKBONE, weights="none")
    with pytest.raises(ConfigError, match="image_size=64, but the datamodule's preprocessing is 32 px"):
        tiny_model(tiny_data(image_folder), image_size=64)
    with pytest.raises(ConfigError, match="class_names: for_data takes them from the datamodule"):
        tiny_model(tiny_data(image_folder), class_names=["a", "b"])


@pytest.mark.parametrize("mode", ["linear_probe", "lp_ft", "full", "gradual", "partial"])
def test_drop_rate_drops_features_before_the_head_in_every_mode(mode: str) -> None:
    from vision_transfer.data.dataset import FeatureBatch

    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, mode=mode, drop_rate=0.5, class_names=["a", "b", "c"]
    )
    images = torch.randn(4, 3, TINY_SIZE, TINY_SIZE)
    features = FeatureBatch(torch.randn(4, model.backbone.num_features), torch.zeros(4, dtype=torch.long))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))  # dropout active in training, backbone frozen or not
        assert not torch.equal(features.logits(model), features.logits(model))  # cached features too
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_a_feature_batch_and_an_image_batch_give_the_same_steps(task: str) -> None:
    """Cached features and the images they came from: the same logits, loss and final probabilities
    (temperature and thresholds included) at every step; the batch answers, the model never asks."""
    from vision_transfer.data.dataset import FeatureBatch, ImageBatch

    model = ImageClassifier(
        TINY_BACKBONE, weights="none", image_size=TINY_SIZE, mode="linear_probe", task=task, class_names=["a", "b", "c"]
    )
    model.temperature.fill_(2.5)
    model.eval()
    images = torch.randint(0, 256, (4, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1]) if task == "multiclass" else torch.tensor([[1, 0, 1], [0, 1, 0]] * 2).float()
    image_batch = model.on_after_batch_transfer(
        (images, labels), 0
    )  # a plain (images, labels) pair, as users' loaders give
    assert isinstance(image_batch, ImageBatch)
    with torch.no_grad():
        features = FeatureBatch(model.forward_features(image_batch.images), labels)
        assert model.on_after_batch_transfer(features, 0) is features
        torch.testing.assert_close(features.logits(model), image_batch.logits(model))
        torch.testing.assert_close(model.predict_step(features, 0), model.predict_step(image_batch, 0))
        torch.testing.assert_close(model.test_step(features, 0), model.test_step(image_batch, 0))
    assert features.tta_logits(model) is None and image_batch.tta_logits(model) is not None
