"""Learning rates follow the unfreezing schedule under every scheduler, also when max_steps ends training early."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import TINY_BACKBONE, tiny_data, tiny_model, write_folder
from vision_transfer.tasks import ImageClassifier

LR, HEAD_LR = 0.01, 0.05


class LrLog(pl.Callback):
    """At each step: the frozen groups and every optimizer group's learning rate."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        groups = trainer.optimizers[0].param_groups
        self.steps.append(
            {
                "step": trainer.global_step,
                "frozen": pl_module.policy.num_frozen,
                "stages": {g["stage"]: g["lr"] for g in groups},  # decay/no_decay groups share a rate
            }
        )


def _fit(tmp_path: Path, mode: str, scheduler: str, max_steps: int) -> tuple[LrLog, int, ImageClassifier]:
    folder = tmp_path / "images"
    if not folder.exists():
        write_folder(folder, per_class=12)
    pl.seed_everything(0)
    cosine = {"warmup_epochs": 0, "min_lr_ratio": 0.1} if scheduler == "cosine" else {}  # refused elsewhere
    data = tiny_data(folder, batch_size=4, augment=False)
    model = tiny_model(
        data, mode=mode, scheduler=scheduler, lr=LR, head_lr=HEAD_LR, unfreeze_every=1, lp_epochs=1, **cosine
    )
    log = LrLog()
    trainer = pl.Trainer(
        max_epochs=4, max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[log], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    return log, int(trainer.num_training_batches), model


@pytest.mark.parametrize("max_steps", [-1, 12], ids=["max_epochs", "max_steps_first"])
@pytest.mark.parametrize("scheduler", ["cosine", "constant", "plateau"])
@pytest.mark.parametrize("mode", ["lp_ft", "gradual"])
def test_learning_rates_follow_the_unfreezing_schedule(
    tmp_path: Path, mode: str, scheduler: str, max_steps: int
) -> None:
    log, per_epoch, model = _fit(tmp_path, mode, scheduler, max_steps)
    top = len(model.policy.groups) - 1
    assert per_epoch > 3 and len(log.steps) == (max_steps if max_steps > 0 else 4 * per_epoch)
    for entry in log.steps:
        step, frozen, lrs = entry["step"], entry["frozen"], entry["stages"]
        assert frozen == model.policy.frozen_at(step // per_epoch, step)  # the policy switches at epoch boundaries
        if scheduler != "plateau":  # a scheduler that multiplies each group's rate cannot hold a frozen one at 0
            assert [lrs[s] > 0 for s in range(top + 1)] == [s >= frozen for s in range(top + 1)], entry
        if mode == "lp_ft" and frozen == 0:  # the fine-tune: the head at the backbone's rate, as documented
            assert lrs[-1] == pytest.approx(lrs[top], rel=1e-6), entry
        if mode == "lp_ft" and frozen > 0 and scheduler != "cosine":
            assert lrs[-1] == pytest.approx(HEAD_LR), entry
    if mode == "lp_ft":
        assert any(e["frozen"] == 0 for e in log.steps)  # the fine-tune phase was reached in every variant


def test_a_skipped_batch_counts_as_a_step_for_the_schedule_and_the_policy(tmp_path: Path) -> None:
    """A training step that returns None (one image left after on_bad_image=skip) still advances
    global_step and the LR schedule together, so unfreezing and learning rates stay in step."""
    write_folder(tmp_path / "images", per_class=8)

    class SkipsOne(ImageClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    data = tiny_data(tmp_path / "images", batch_size=4)
    model = SkipsOne.for_data(data, backbone=TINY_BACKBONE, weights="none", warmup_epochs=0, mode="gradual")
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == scheduler.last_epoch == 2 * math.ceil(trainer.num_training_batches)  # type: ignore[attr-defined]
