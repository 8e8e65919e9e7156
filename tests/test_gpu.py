"""Mixed precision on CUDA (run by benchmarks/gpu_check.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_fit_args, tiny_model
from tests.test_cli import run_cli
from vision_transfer.backbones import create_backbone
from vision_transfer.datamodules import CachedFeatureDataModule
from vision_transfer.features.extract import FeatureExtractor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
@pytest.mark.parametrize("mode", ["full", "gradual", "linear_probe"])
def test_mixed_precision_training_on_cuda(tmp_path: Path, image_folder: Path, precision: str, mode: str) -> None:
    data = tiny_data(image_folder)
    model = tiny_model(data, mode=mode, warmup_epochs=0)
    before = {k: v.detach().clone() for k, v in model.backbone.state_dict().items() if v.is_floating_point()}
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    devices: set[str] = set()
    trainer.callbacks.append(  # type: ignore[attr-defined]
        pl.callbacks.LambdaCallback(on_train_batch_end=lambda t, m, *_: devices.add(m.head.weight.device.type))
    )
    trainer.fit(model, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert devices == {"cuda"}  # Lightning moves the model back to the CPU after fit
    after = model.backbone.state_dict()
    changed = sum(not torch.equal(before[k], after[k].cpu()) for k in before)
    # the frozen backbone keeps every tensor (BatchNorm statistics included); the others train
    assert (changed == 0) if mode == "linear_probe" else (changed > 0)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_extraction_under_autocast_matches_fp32(precision: str) -> None:
    backbone, config = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    images = torch.randint(0, 256, (16, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    device = torch.device("cuda")
    reference = FeatureExtractor(backbone, config, device, "32")(images)
    features = FeatureExtractor(backbone, config, device, precision)(images)
    assert features.dtype == torch.float32 and features.device.type == "cuda"
    assert torch.isfinite(features).all()
    cosine = torch.nn.functional.cosine_similarity(features, reference, dim=1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cached_linear_probe_extracts_on_the_training_device(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    seen: list[tuple[str, str]] = []
    call = FeatureExtractor.__call__

    def recording(self: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        seen.append((self.device.type, self.precision))
        return call(self, images)

    monkeypatch.setattr(FeatureExtractor, "__call__", recording)
    images = tiny_data(image_folder)
    model = tiny_model(
        images, mode="linear_probe", cache_features=True, cache_dir=str(tmp_path / "cache"), warmup_epochs=0
    )
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, CachedFeatureDataModule(images, model))
    expected = "bf16" if precision == "bf16-mixed" else "32"
    assert seen and set(seen) == {("cuda", expected)}, seen


def test_real_out_of_gpu_memory_names_the_batch_size(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a real allocation failure: cap this process at ~200 MiB, then ask for a 512 px batch of 64
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(200 * 2**20 / total)
    try:
        data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
        args = tiny_fit_args(data, tmp_path, "--trainer.accelerator=gpu", "--data.init_args.batch_size=24")
        args = [a for a in args if not a.startswith("--model.image_size")] + ["--model.image_size=512"]
        assert run_cli(args) == 2
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "vision-transfer: error: out of GPU memory at batch size 24; try `--data.init_args.batch_size 12`"
    )
