"""Bad input the user asked to skip, the pre-flight data check, and more bad-input cases."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint

from tests.conftest import tiny_data, tiny_fit_args, tiny_model, write_folder
from tests.test_cli import run_cli
from vision_transfer.data import load_image
from vision_transfer.data.check import check_source, read_any
from vision_transfer.errors import ImageLoadError, VisionTransferError


def _corrupt(folder: Path) -> None:
    (folder / "circle" / "empty.png").write_bytes(b"")
    (folder / "square" / "text.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(folder / "full.jpg")
    (folder / "stripes" / "cut.jpg").write_bytes((folder / "full.jpg").read_bytes()[:700])
    (folder / "full.jpg").unlink()


def test_on_bad_image_skip_trains_and_lists_what_it_skipped(tmp_path: Path, image_folder: Path) -> None:
    _corrupt(image_folder)
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={image_folder}"]
    assert run_cli(tiny_fit_args(data, tmp_path, "--data.init_args.on_bad_image=skip")) == 0
    listing = next((tmp_path / "runs").rglob("skipped_images.csv"))
    with listing.open() as f:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert rows.keys() == {"empty.png", "text.png", "cut.jpg"}
    assert "empty file" in rows["empty.png"] and "truncated" in rows["cut.jpg"]
    # the default still stops, naming the first bad file
    assert run_cli(tiny_fit_args(data, tmp_path)) == 2


def test_check_data_reports_counts_unreadable_files_and_leaks(tmp_path: Path, split_folder: Path) -> None:
    _corrupt(split_folder / "train")
    shutil.copy(split_folder / "train" / "circle" / "circle_0.png", split_folder / "test" / "circle" / "copy.png")
    report = check_source(read_any(str(split_folder)))
    assert report.counts["train"]["circle"] == 9 and report.counts["test"]["circle"] == 4
    assert {Path(p).name for p, _ in report.unreadable} == {"empty.png", "text.png", "cut.jpg"}
    assert len(report.cross_split_duplicates) == 1 and "copy.png" in report.cross_split_duplicates[0][1]
    text = report.format()
    assert "| circle | 9 | 3 | 4 |" in text and "1 across splits" in text and "PNG" not in text.split("modes:")[0]
    assert run_cli(["check-data", str(split_folder)]) == 1
    clean = write_folder(tmp_path / "clean")
    assert run_cli(["check-data", str(clean)]) == 0
    assert run_cli(["check-data", "fashion-mnist", "--headers-only"]) == 0


@pytest.mark.parametrize(
    ("size", "message"),
    [((1, 1), None), ((20_001, 20_001), "decompression-bomb guard")],
)
def test_tiny_and_huge_images(tmp_path: Path, size: tuple[int, int], message: str | None) -> None:
    path = tmp_path / "odd.png"
    Image.new("L", size).save(path)
    if message is None:
        assert load_image(path).shape == (1, 1, 3)  # a 1x1 image is valid input: resized like any other
    else:
        with pytest.raises(ImageLoadError, match=message):
            load_image(path)


def test_dataset_with_one_class_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "one", classes=("only",))
    data = ["--data=vision_transfer.datamodules.ImageFolderDataModule", f"--data.init_args.root={folder}"]
    assert run_cli(tiny_fit_args(data, tmp_path)) == 2
    assert "found 1 class; a classifier needs at least 2" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    class PoisonAt(pl.Callback):  # a parameter turns NaN at global step 5 (epoch 2): the loss follows
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step == 5:
                with torch.no_grad():
                    pl_module.head.weight.fill_(float("nan"))

    data = tiny_data(image_folder)
    model = tiny_model(data, warmup_epochs=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(
        max_epochs=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[checkpoint, PoisonAt()], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(
        VisionTransferError, match=r"loss is nan at step 5 \(epoch 2\).*last good checkpoint is .*last\.ckpt"
    ):
        trainer.fit(model, data)
    good = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert good["global_step"] == 4 and all(torch.isfinite(v).all() for v in good["state_dict"].values())
    guards = [type(c).__name__ for c in tiny_model(data, stop_on_nan=False).configure_callbacks()]
    assert "StopOnNonFiniteLoss" not in guards  # stop_on_nan=False: no guard, the loss goes on
