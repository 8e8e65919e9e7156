"""Learning rates follow the unfreezing schedule under every scheduler, also when max_steps ends training early."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_model, write_folder
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


# -- the policy alone: optimizer and schedule for every mode x scheduler x optimizer, no Trainer --------------
CURVES = Path(__file__).parent / "data" / "lr_schedules.json"  # recorded from the classifier before issue 23
LENGTH = (30, 6.0)  # optimizer steps in the run, per epoch
PROBE_EPOCHS = [0, 1, 2, 3, 3]  # finish_probe_phase calls, in order (LP-FT's fine-tune starts at epoch 2)


def schedule_cases() -> list[tuple[str, dict[str, Any]]]:
    """(id, ImageClassifier/TuningConfig options): every Mode x Scheduler x Optimizer, options that act there
    set away from their defaults, and a few variants (step milestones, no head_lr, no probe epochs, defaults)."""
    from typing import get_args

    from vision_transfer.tuning.config import Mode, Optimizer, Scheduler

    cases = []
    for mode in get_args(Mode):
        for scheduler in get_args(Scheduler):
            for optimizer in get_args(Optimizer):
                options: dict[str, Any] = {"mode": mode, "scheduler": scheduler, "optimizer": optimizer}
                options |= {"lr": 0.01, "head_lr": 0.05, "weight_decay": 0.02}
                options |= {"momentum": 0.8} if optimizer == "sgd" else {}
                options |= {"layer_decay": 0.7} if mode != "linear_probe" else {}
                options |= {"trainable_groups": 2} if mode == "partial" else {}
                options |= {"unfreeze_every": 1} if mode == "gradual" else {}
                options |= {"lp_epochs": 2} if mode == "lp_ft" else {}
                options |= {"warmup_epochs": 0.5, "min_lr_ratio": 0.1} if scheduler == "cosine" else {}
                options |= {"rewarm": True} if scheduler == "cosine" and mode in ("gradual", "lp_ft") else {}
                options |= {"plateau_factor": 0.5, "plateau_patience": 3} if scheduler == "plateau" else {}
                cases.append((f"{mode}-{scheduler}-{optimizer}", options))
    for scheduler in ("cosine", "constant"):
        steps = {"mode": "gradual", "unfreeze_milestones": [5, 9, 20], "milestone_unit": "step", "scheduler": scheduler}
        cases.append((f"gradual-steps-{scheduler}", steps | {"layer_decay": 0.5}))
    for scheduler in get_args(Scheduler):
        cases.append((f"lp_ft-no_head_lr-{scheduler}", {"mode": "lp_ft", "scheduler": scheduler, "lp_epochs": 2}))
        cases.append((f"defaults-{scheduler}", {"scheduler": scheduler}))
    cases.append(("lp_ft-no_probe-cosine", {"mode": "lp_ft", "lp_epochs": 0, "head_lr": 0.1}))
    return cases


def schedule_record(config: dict[str, Any], finish: Any) -> dict[str, Any]:
    """What an optimizer/scheduler dict does: the optimizer's settings and groups, the scheduler's settings and
    every group's LR multiplier at each step of the run, and the groups' rates after ``finish(optimizer, epoch)``
    at each of ``PROBE_EPOCHS`` (LP-FT's move of the head's rate under ``plateau``)."""
    optimizer = config["optimizer"]
    scheduler = config["lr_scheduler"]["scheduler"]
    keys = ("lr", "momentum", "nesterov", "dampening", "weight_decay", "betas", "eps", "amsgrad", "fused")
    record: dict[str, Any] = {
        "optimizer": type(optimizer).__name__,
        "defaults": {k: list(v) if isinstance(v, tuple) else v for k, v in optimizer.defaults.items() if k in keys},
        "groups": [
            {k: g.get(k) for k in ("name", "stage", "lr", "initial_lr", "weight_decay")} | {"params": len(g["params"])}
            for g in optimizer.param_groups
        ],
        "lr_scheduler": {k: v for k, v in config["lr_scheduler"].items() if k != "scheduler"},
        "scheduler": type(scheduler).__name__,
    }
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        record |= {"plateau": [scheduler.mode, scheduler.factor, scheduler.patience]}
    else:
        curves: dict[str, list[float]] = {}  # one per stage: its decay and no_decay groups share it
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):  # type: ignore[attr-defined]
            curve = [float(f"{factor(step):.12g}") for step in range(LENGTH[0] + 3)]
            assert curves.setdefault(str(group["stage"]), curve) == curve, group["name"]
        record["multipliers"] = curves
    after = []
    for epoch in PROBE_EPOCHS:
        finish(optimizer, epoch)
        after.append([g["lr"] for g in optimizer.param_groups])
    record["after_probe_phase"] = after
    return record


@pytest.mark.parametrize(("case_id", "options"), schedule_cases(), ids=[case for case, _ in schedule_cases()])
def test_the_policy_alone_builds_the_optimizer_and_schedule_the_classifier_did(
    case_id: str, options: dict[str, Any]
) -> None:
    """Every mode x scheduler x optimizer, from the policy and a head, without a model or a Trainer: the
    same optimizer groups, scheduler and per-step LR multipliers the classifier built before the policy
    owned them (recorded in ``data/lr_schedules.json``), and LP-FT's head rate moved once under plateau."""
    import json

    from vision_transfer.backbones import create_backbone
    from vision_transfer.tuning import TuningConfig, TuningPolicy

    expected = json.loads(CURVES.read_text())[case_id]
    assert expected["options"] == options
    backbone, _ = create_backbone(TINY_BACKBONE, "none", image_size=TINY_SIZE)
    policy = TuningPolicy(backbone, TuningConfig(**options))
    head = torch.nn.Linear(backbone.num_features, 3)  # type: ignore[arg-type]
    asked: list[int] = []

    def length() -> tuple[int, float]:
        asked.append(1)
        return LENGTH

    config = policy.configure_optimizers(head, length, "val/acc", fused=False)
    assert asked == ([] if policy.config.scheduler == "plateau" else [1])  # plateau never asks for the run's length
    got = {"options": options, **schedule_record(config, policy.finish_probe_phase)}
    assert not _differences(got, expected), _differences(got, expected)[:10]


def _differences(got: Any, expected: Any, path: str = "") -> list[str]:
    """Where two JSON-like records differ (floats to 1e-9 relative: the recording rounds to 12 digits)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(got) != set(expected):
            return [f"{path}: keys {sorted(got)} != {sorted(expected)}"]
        return [d for k in expected for d in _differences(got[k], expected[k], f"{path}/{k}")]
    if isinstance(expected, list) and isinstance(got, list):
        if len(got) != len(expected):
            return [f"{path}: {len(got)} items != {len(expected)}"]
        pairs = enumerate(zip(got, expected, strict=True))
        return [d for i, (g, e) in pairs for d in _differences(g, e, f"{path}[{i}]")]
    same = (
        math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
        if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool)
        else type(got) is type(expected) and got == expected
    )
    return [] if same else [f"{path}: {got!r} != {expected!r}"]


def test_the_recorded_schedules_cover_every_mode_scheduler_and_optimizer() -> None:
    import json
    from typing import get_args

    from vision_transfer.tuning.config import Mode, Optimizer, Scheduler

    recorded = json.loads(CURVES.read_text())
    defaults = {"mode": "full", "scheduler": "cosine", "optimizer": "adamw"}
    combos = {tuple((defaults | r["options"])[k] for k in defaults) for r in recorded.values()}
    assert combos >= {(m, s, o) for m in get_args(Mode) for s in get_args(Scheduler) for o in get_args(Optimizer)}
    assert [case for case, _ in schedule_cases()] == list(recorded)
    lp_ft = recorded["lp_ft-plateau-adamw"]["after_probe_phase"]
    assert [lrs[-1] for lrs in lp_ft] == pytest.approx([0.05, 0.05, 0.01, 0.01, 0.01])  # once, at lp_epochs=2
