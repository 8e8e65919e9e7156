"""Real weights on real data: ImageNet pretraining must help on a Fashion-MNIST subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl

from vision_transfer.backbones import preprocessing
from vision_transfer.datamodules import FashionMNISTDataModule
from vision_transfer.tasks import ImageClassifier

IMAGE_SIZE = 32


def _fine_tune(weights: str, tmp_path: Path) -> float:
    pl.seed_everything(0)
    datamodule = FashionMNISTDataModule(
        batch_size=64, num_workers=0, max_train_samples=768, max_val_samples=100, max_test_samples=500,
        data_config=preprocessing("tf_efficientnet_lite0", weights, image_size=IMAGE_SIZE),
    )  # fmt: skip
    model = ImageClassifier.for_data(
        datamodule, backbone="tf_efficientnet_lite0", weights=weights, image_size=IMAGE_SIZE, lr=2e-3, head_lr=4e-3,
        warmup_epochs=0.2,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule)
    return float(trainer.test(model, datamodule, verbose=False)[0]["test/acc"])


@pytest.mark.slow
def test_packaged_imagenet_weights_beat_random_init_on_fashion_mnist(tmp_path: Path) -> None:
    pretrained = _fine_tune("packaged", tmp_path)
    scratch = _fine_tune("none", tmp_path)
    print(
        f"Fashion-MNIST 768 train / 500 test, 2 epochs at {IMAGE_SIZE} px: "
        f"packaged {pretrained:.3f}, random {scratch:.3f}"
    )
    assert pretrained > scratch + 0.05
    # 5x chance after 24 steps (measured 0.634 at 32 px, seed 0; random init 0.100): the pipeline really learns
    assert pretrained > 0.5
