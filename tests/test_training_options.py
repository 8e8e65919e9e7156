"""timm train.py's speed/memory options: what each changes, and that training still works."""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_fit_args
from tests.test_cli import run_cli
from vision_transfer.tasks import ImageClassifier


def _step(
    model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor
) -> tuple[int, dict[str, torch.Tensor | None]]:
    """Bytes autograd saves for the backward pass, and every parameter's gradient, for one step."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(model.preprocess(images)), labels)
    loss.backward()
    return saved, {name: p.grad for name, p in model.named_parameters()}


def _model(**options: bool) -> ImageClassifier:
    torch.manual_seed(0)
    model = ImageClassifier(TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=list("abc"), **options)
    return model.train()


@pytest.mark.parametrize("mode", ["full", "gradual"])
def test_grad_checkpointing_stores_less_and_gives_the_same_gradients(mode: str) -> None:
    images = torch.randint(0, 256, (8, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    plain, checkpointed = _model(mode=mode), _model(mode=mode, grad_checkpointing=True)  # type: ignore[arg-type]
    for model in (plain, checkpointed):
        model.policy.update(epoch=2, step=0)  # gradual: head + the top two groups train, the rest is frozen
    saved_plain, grads_plain = _step(plain, images, labels)
    saved_ckpt, grads_ckpt = _step(checkpointed, images, labels)
    # full: every block is checkpointed; gradual: only the unfrozen top ones, the head's part stays
    assert saved_ckpt < saved_plain * (0.5 if mode == "full" else 0.8)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        other = grads_ckpt[name]
        if grad is None or other is None:  # frozen: neither run may compute it
            assert grad is None and other is None, name
            assert name.removeprefix("backbone.") in plain.policy.frozen_parameter_names, name
        else:
            assert torch.allclose(grad, other, atol=1e-6), name
    frozen = plain.policy.frozen_parameter_names
    assert bool(frozen) == (mode == "gradual")


def test_channels_last_changes_the_layout_not_the_result() -> None:
    images = torch.randint(0, 256, (4, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    plain, nhwc = _model(), _model(channels_last=True)
    nhwc.setup("test")  # where the layout changes
    batch = nhwc.preprocess(images)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(plain.preprocess(images)), nhwc.eval()(batch), atol=1e-5)


def test_compiled_backbone_trains_through_the_unfreezing_hooks(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo's graph capture is what our hooks could break; inductor's C++ build adds minutes
    # on a CPU, so the test compiles with the aot_eager backend.
    monkeypatch.setattr(
        torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
    )
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = tiny_fit_args(data, tmp_path, "--model.compile=true", "--model.mode=gradual", "--test_after_fit=false")
    assert run_cli(args) == 0
    run = next((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert "backbone.conv_stem.weight" in checkpoint["state_dict"]  # names unchanged by compile


def test_accumulation_and_ema_work_from_the_cli(tmp_path: Path, image_folder: Path) -> None:
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    args = tiny_fit_args(
        data,
        tmp_path,
        "--trainer.accumulate_grad_batches=2",
        "--trainer.callbacks+=pytorch_lightning.callbacks.EMAWeightAveraging",
        "--trainer.callbacks.decay=0.9",
        "--test_after_fit=false",
    )
    assert run_cli(args) == 0
    run = next((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    with (run / "splits.csv").open() as f:
        batches = sum(row["split"] == "train" for row in csv.DictReader(f)) // 8  # the loader drops the last
    assert batches >= 2 and checkpoint["global_step"] == math.ceil(batches / 2)  # one step per two batches
    assert any("EMAWeightAveraging" in key for key in checkpoint["callbacks"])
