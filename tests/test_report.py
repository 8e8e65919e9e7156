"""A run folder holds everything a user looks at; ``report`` and ``lr-find`` work from the CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tests.conftest import tiny_fit_args, write_folder
from tests.test_cli import _png_ok, run_cli
from vision_transfer.app.lr_finder import LrFinderResult, valley

PLOTS = ("curves.png", "confusion_matrix.png", "per_class_accuracy.png", "worst_test_images.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    root = write_folder(tmp / "images", per_class=10)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={root}"]
    data += ["--data.init_args.val_fraction=0.2", "--data.init_args.test_fraction=0.3"]
    assert run_cli(tiny_fit_args(data, tmp, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1")) == 0
    return next((tmp / "runs" / "lightning_logs").glob("version_*"))


def _csv_values(run: Path, key: str) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_run_folder_has_config_checkpoints_logs_plots_and_summary(run_dir: Path) -> None:
    for name in ("config.yaml", "metrics.csv", "splits.csv", "per_class.csv", "confusion_matrix.csv", "run.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    for name in PLOTS:
        assert _png_ok(run_dir / name), name
    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["model"]["backbone"] == "test_efficientnet" and facts["data"]["classes"] == 3
    assert facts["fit"]["epochs"] == 2 and facts["fit"]["steps"] > 0
    summary = (run_dir / "summary.md").read_text()
    # the summary's numbers are the logged ones
    test_acc = _csv_values(run_dir, "test/acc")[-1]
    assert f"| test/acc | {test_acc:.4f} |" in summary
    assert f"| best val/acc | {max(_csv_values(run_dir, 'val/acc')):.4f}" in summary
    assert "test_efficientnet" in summary and "Per-class recall on test, lowest first" in summary
    for name in PLOTS:
        assert f"({name})" in summary


def test_tensorboard_events_hold_the_same_scalars_as_the_csv(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/acc", "test/acc"} <= tags
    logged = [e.value for e in events.Scalars("val/acc")]
    assert logged == pytest.approx(_csv_values(run_dir, "val/acc"), abs=1e-6)
    assert any(tag.startswith("lr") for tag in tags)


def test_report_redraws_plots_and_prints_the_summary(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in (*PLOTS[:3], "summary.md"):
        (run_dir / name).unlink()
    capsys.readouterr()
    assert run_cli(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name in PLOTS[:3]:
        assert _png_ok(run_dir / name), name
    assert (run_dir / "summary.md").read_text() in out
    assert "| test/acc |" in out


def test_report_on_a_folder_that_is_no_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert run_cli(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_lr_find_plots_loss_against_lr_and_suggests_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_folder(tmp_path / "images", per_class=12)
    args = tiny_fit_args(
        ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={root}"], tmp_path
    )[1:]  # lr-find takes fit's options, without the subcommand
    out = tmp_path / "lr"
    assert run_cli(["lr-find", "--num_training=40", "--min_lr=1e-6", "--max_lr=1", f"--output={out}", *args]) == 0
    printed = capsys.readouterr().out
    assert _png_ok(out / "lr_find.png")
    match = re.search(r"suggested lr\s+([0-9.e+-]+)", printed)
    assert match, printed
    assert 1e-7 <= float(match.group(1)) <= 1.0
    assert not list(out.glob(".lr_find*.ckpt"))  # Lightning's temporary checkpoint is gone


SWEEP_MODES = {
    "full": {},
    "linear_probe": {"mode": "linear_probe"},
    "partial": {"mode": "partial", "trainable_groups": 1},
    "gradual, epoch milestones": {"mode": "gradual", "unfreeze_every": 1},
    "gradual, step milestones": {"mode": "gradual", "unfreeze_every": 2, "milestone_unit": "step"},
    "lp_ft": {"mode": "lp_ft", "lp_epochs": 1},
    "lp_ft, plateau": {"mode": "lp_ft", "lp_epochs": 1, "scheduler": "plateau"},
}


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("sweep") / "images", per_class=8)


@pytest.mark.parametrize("options", SWEEP_MODES.values(), ids=SWEEP_MODES.keys())
def test_lr_sweep_runs_every_step_on_the_first_stage(sweep_folder: Path, options: dict[str, object]) -> None:
    """A training set of a few batches: the 20-step sweep spans 7 epochs of a max_epochs=1 trainer. Every
    step runs (Lightning's ``lr_find`` alone stopped at max_epochs: 3 steps), all on the first stage's frozen
    set and at one rate for all groups, whatever the mode's milestones; the trainer and the schedule are
    as they were afterwards."""
    import pytorch_lightning as pl

    from tests.conftest import tiny_data, tiny_model
    from vision_transfer.app.lr_finder import find_lr

    data = tiny_data(sweep_folder, val_fraction=0.2, test_fraction=0.1)
    model = tiny_model(data, lr=1e-3, head_lr=1e-2, **options)
    start = model.policy.frozen_at(0, 0)
    seen: list[tuple[int, set[float]]] = []
    step = model.training_step

    def recording(batch: object, batch_idx: int) -> object:
        rates = {group["lr"] for group in model.trainer.optimizers[0].param_groups}
        seen.append((model.policy.num_frozen, rates))
        return step(batch, batch_idx)

    model.training_step = recording  # type: ignore[method-assign]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    result = find_lr(trainer, model, data, min_lr=1e-5, max_lr=1.0, num_training=20)
    assert len(seen) == 20 and len(result.lrs) == 20 - min(10, 20 // 5)
    assert [frozen for frozen, _ in seen] == [start] * 20
    assert all(len(rates) == 1 for _, rates in seen)  # the sweep's one rate, never a phase's head rate
    assert result.lrs[-1] > 0.1  # the sweep reached the top of its range
    assert trainer.max_epochs == 1
    assert not model.policy.update(0, 0) and model.policy.num_frozen == start
    later = model.policy.frozen_at(10, 10**6)
    assert model.policy.update(10, 10**6) == (later != start)  # the schedule moves again after the sweep


def test_lr_suggestion_falls_back_when_the_steepest_point_is_past_the_minimum() -> None:
    lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    inside = LrFinderResult(lrs, [2.0, 1.5, 1.0, 0.5, 3.0], steepest=1e-3, min_over_10=1e-3, plot=None)
    assert inside.suggested == 1e-3
    past = LrFinderResult(lrs, [2.0, 1.5, 1.0, 0.5, 3.0], steepest=1e-1, min_over_10=1e-3, plot=None)
    assert past.suggested == 1e-3


def _noisy_then_valley() -> tuple[list[float], list[float]]:
    """A range test's shape: flat and noisy at tiny rates (one sharp dip), a long descent from 1e-4 to
    1e-2, then divergence; the sharpest single drop is the noise, far below any useful rate."""
    import numpy as np

    lrs = np.geomspace(1e-7, 1.0, 100)
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-3 * (x + 3))) + 4.0 * np.clip(x + 1.6, 0, None) ** 2
    losses[12] -= 0.15  # the dip: steepest descent lands here
    losses[13] += 0.02
    losses[:40] += 0.01 * np.sin(np.arange(40))  # noise on the flat part
    return lrs.tolist(), losses.tolist()


def test_lr_suggestion_is_the_valley_not_a_noisy_steepest_point() -> None:
    lrs, losses = _noisy_then_valley()
    steepest = lrs[12]  # what the steepest-descent rule picked on such curves (Fashion-MNIST, lite0: 3.3e-5)
    low = valley(lrs, losses)
    assert low is not None and 1e-4 <= low <= 1e-2
    result = LrFinderResult(lrs, losses, steepest=steepest, min_over_10=1e-3, plot=None, valley=low)
    assert result.suggested == low
    assert LrFinderResult(lrs, losses, steepest=steepest, min_over_10=1e-3, plot=None).suggested == steepest
    assert valley(lrs[:2], losses[:2]) is None  # too short to have a valley
    rising = valley(lrs[:10] + lrs[10:], [1.0] * 10 + [float(i) for i in range(2, 92)])
    assert rising == lrs[0]  # no descent: the first rate, never one where the loss has grown
