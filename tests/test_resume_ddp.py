"""Unfreezing survives checkpoint resume, DDP and ReduceLROnPlateau."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import tiny_data, tiny_model, write_folder

REPO = Path(__file__).resolve().parents[1]


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _run(folder: Path, root: Path, callbacks: list[pl.Callback], ckpt_path: str | None = None, **model_kwargs):
    pl.seed_everything(0)
    options = dict(mode="gradual", unfreeze_every=1, lr=0.02, head_lr=0.05, layer_decay=0.7, warmup_epochs=0.5)
    # no random augmentation, so an interrupted and an uninterrupted run see identical batches
    data = tiny_data(folder, augment=False)
    model = tiny_model(data, **{**options, **model_kwargs})
    trainer = pl.Trainer(
        max_epochs=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=True)
    return model, trainer


# bitfit freezes by requires_grad too, as LoRA's base; the teacher is loaded again when the resumed fit sets up
@pytest.mark.parametrize("case", ["none", "lora", "teacher"])
def test_resume_mid_gradual_schedule_matches_an_uninterrupted_run(
    tmp_path: Path, image_folder: Path, case: str
) -> None:
    extra = {"teacher": _teacher(tmp_path), "kd_alpha": 0.7} if case == "teacher" else {"peft": case}
    whole, whole_trainer = _run(image_folder, tmp_path / "whole", [], **extra)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, first = _run(image_folder, tmp_path / "part", [checkpoint, StopAfterEpoch(1)], **extra)
    assert first.current_epoch == 2 and whole.policy.num_frozen == len(whole.policy.groups) - 4
    last = str(tmp_path / "ckpt" / "last.ckpt")
    resumed, resumed_trainer = _run(image_folder, tmp_path / "part", [], ckpt_path=last, **extra)
    if case == "teacher":
        assert resumed._teacher is not None and not any("teacher" in k for k in resumed.state_dict())

    assert resumed.policy.num_frozen == whole.policy.num_frozen
    assert resumed_trainer.global_step == whole_trainer.global_step
    groups_a = whole_trainer.optimizers[0].param_groups
    groups_b = resumed_trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups_a] == [g["name"] for g in groups_b]
    assert [g["lr"] for g in groups_a] == pytest.approx([g["lr"] for g in groups_b])
    state_a, state_b = whole_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert state_a["state"].keys() == state_b["state"].keys()
    for key, value in state_a["state"].items():
        assert torch.allclose(value["exp_avg"], state_b["state"][key]["exp_avg"], atol=1e-5)
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float(), atol=1e-4), key


def test_plateau_scheduler_runs_through_unfreeze_milestones(tmp_path: Path, image_folder: Path) -> None:
    model, trainer = _run(
        image_folder, tmp_path, [], scheduler="plateau", plateau_patience=0, plateau_factor=0.5, unfreeze_every=1
    )
    groups = trainer.optimizers[0].param_groups
    head = next(g for g in groups if g["name"] == "head")
    top = next(g for g in groups if g["name"] == f"stage{len(model.policy.groups) - 1}")
    assert head["lr"] <= 0.05 and top["lr"] / head["lr"] == pytest.approx(0.02 / 0.05)  # ratios kept
    assert model.policy.num_frozen < len(model.policy.groups)


def _teacher(folder: Path) -> str:
    """A test_resnet teacher (random weights, 48 px) for the tiny model's three classes."""
    from tests.conftest import CLASSES
    from vision_transfer.tasks import ImageClassifier

    torch.manual_seed(1)
    model = ImageClassifier(backbone="test_resnet", weights="none", class_names=list(CLASSES), image_size=48)
    return str(model.save_standalone_checkpoint(folder / "teacher.ckpt"))


def _ddp(out: Path, strategy: str, peft: str = "none", *teacher: str) -> subprocess.CompletedProcess[str]:
    write_folder(out / "images", per_class=12)
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_run.py"), str(out), strategy, peft, *teacher],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
    )


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    result = _ddp(tmp_path, "ddp_find_unused_parameters_true")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["world"] == 2
    groups = rank0["frozen"][0]
    assert rank0["frozen"] == rank1["frozen"] == [groups, groups - 1, groups - 2]  # milestones mid-run
    for key, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][key]), key


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_is_refused_clearly(tmp_path: Path) -> None:
    result = _ddp(tmp_path, "ddp")
    assert result.returncode != 0
    assert "use --trainer.strategy ddp_find_unused_parameters_true" in result.stderr


@pytest.mark.slow
def test_ddp_trains_lora_adapters_and_distils_on_every_rank_without_find_unused_parameters(tmp_path: Path) -> None:
    """A LoRA student distilled (logits and features, kd_cache) from a teacher: only the adapters and the head require
    grad, and all of them are used, so plain DDP works; each rank loads the teacher itself (it is not part of the
    module DDP wraps). Both ranks end identical and trained, the base weights and BatchNorm statistics as they
    started, no teacher weight in the state."""
    result = _ddp(tmp_path, "ddp", "lora", _teacher(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kd_feature_weight=100.0" in result.stdout  # the teacher was announced (rank 0)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["world"] == 2 and not any("teacher" in k for k in rank0["state_dict"])
    for key, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][key]), key
        moved = not torch.equal(value, rank0["initial"][key])
        if key.startswith("backbone.") and ".lora_" not in key:
            assert not moved, f"{key}: a frozen base weight moved"
    assert any(not torch.equal(v, rank0["initial"][k]) for k, v in rank0["state_dict"].items() if ".lora_B." in k)
    # kd_cache: each rank ran the teacher on views new to both (its share), and at each epoch's end both took
    # the other's outputs: both hold the same set, more than either computed; rank 0 kept them in one file
    (hits0, misses0, rows0), (hits1, misses1, rows1) = rank0["memo"], rank1["memo"]
    assert rows0 == rows1 > max(misses0, misses1) and hits0 + misses0 == hits1 + misses1
    # computed twice: only a view both ranks drew in the same later epoch, one of the 30 - 2 * 12 that the
    # first epoch left out (drop_last)
    assert hits0 > misses0 and hits1 > misses1 and misses0 + misses1 <= rows0 + 6
    assert len(list((tmp_path / "cache" / "teacher").glob("*.safetensors"))) == 1
    assert not torch.equal(rank0["state_dict"]["head.weight"], rank0["initial"]["head.weight"])
