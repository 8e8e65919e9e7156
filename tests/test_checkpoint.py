"""The checkpoint format (vision_transfer.checkpoint): what is written once where, and a broken file refused
with one error type, naming the file, by every reader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import CLASSES, TINY_BACKBONE, TINY_SIZE, tiny_data, tiny_model, write_folder
from tests.test_cli import run_cli
from vision_transfer import load_backbone, load_classifier
from vision_transfer.app.calibrate import calibrate_checkpoint
from vision_transfer.checkpoint import ENTRY, SETTINGS, read_checkpoint
from vision_transfer.errors import CheckpointError
from vision_transfer.tasks import ImageClassifier


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny model built for a generated image folder (not trained: format only)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    datamodule = tiny_data(write_folder(folder / "images"))
    model = tiny_model(datamodule)
    return model.save_standalone_checkpoint(folder / "good.ckpt", datamodule)


def test_each_setting_is_stored_once_and_read_back(saved: Path) -> None:
    content = torch.load(saved, weights_only=True)
    assert set(content[ENTRY]) == {"format", "initial_weights", "prediction", "datamodule"}  # no data_config
    settings = content[SETTINGS]
    assert settings["weights"] == "none" and settings["class_names"] == list(CLASSES)
    assert settings["data_config"]["input_size"] == [3, TINY_SIZE, TINY_SIZE]
    entry, raw = read_checkpoint(saved)
    assert entry.source == str(saved) and entry.backbone == TINY_BACKBONE and entry.task == "multiclass"
    assert entry.class_names == list(CLASSES) and entry.data_config.input_size == (3, TINY_SIZE, TINY_SIZE)
    assert entry.initial_weights["kind"] == "none" and entry.prediction["temperature"] == 1.0
    assert entry.datamodule is not None and entry.datamodule["class_path"].endswith("ImageFolderDataModule")
    assert raw["state_dict"]["head.weight"].shape[0] == len(CLASSES)
    restored = ImageClassifier.load_from_checkpoint(saved, weights_only=True)
    assert restored.data_config == entry.data_config and restored.class_names == list(CLASSES)


def _truncated(path: Path, out: Path) -> None:
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])


def _edited(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    def write(path: Path, out: Path) -> None:
        content = torch.load(path, weights_only=True)
        edit(content)
        torch.save(content, out)

    return write


# each: how the file is broken, and what the one-line message says after "<path>: "
BROKEN = {
    "corrupt": (_truncated, "cannot read weights (PytorchStreamReader failed"),
    "not_ours": (
        _edited(lambda c: c.pop(ENTRY)),
        "a Lightning checkpoint, but not one vision-transfer wrote (no 'vision_transfer' entry).",
    ),
    "missing_data_config": (
        _edited(lambda c: c[SETTINGS].pop("data_config")),
        "data_config in hyper_parameters is missing, expected a dict.",
    ),
    "missing_initial_weights": (
        _edited(lambda c: c[ENTRY].pop("initial_weights")),
        "initial_weights in the 'vision_transfer' entry is missing, expected a dict.",
    ),
    "class_count": (
        _edited(lambda c: c[SETTINGS].update(class_names=["circle", "square"])),
        "names 2 classes, but its head.weight has 3 (the file was altered or mixed up).",
    ),
    "other_format": (
        _edited(lambda c: c[ENTRY].update(format=0)),
        "checkpoint format 0; this vision-transfer reads format 1 only.",
    ),
}


def _cli(*args: str) -> Callable[[Path, pytest.CaptureFixture[str]], str]:
    def read(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
        assert run_cli([arg.format(path=path) for arg in args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vision-transfer: error: ")
        return lines[0].removeprefix("vision-transfer: error: ")

    return read


def _python(reader: Callable[[Path], Any]) -> Callable[[Path, pytest.CaptureFixture[str]], str]:
    def read(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
        with pytest.raises(CheckpointError) as error:
            reader(path)
        return str(error.value)

    return read


def _trainer_validate(path: Path) -> None:
    """Lightning reads ``ckpt_path`` itself; the model's on_load_checkpoint validates what it read."""
    model = ImageClassifier(TINY_BACKBONE, weights="none", image_size=TINY_SIZE, class_names=list(CLASSES))
    batches = DataLoader(TensorDataset(torch.zeros(1, 3, TINY_SIZE, TINY_SIZE, dtype=torch.uint8), torch.zeros(1)))
    pl.Trainer(logger=False, enable_progress_bar=False).validate(model, batches, ckpt_path=path, weights_only=True)


READERS = {
    "cli_test": _cli("test", "--ckpt_path={path}"),
    "cli_predict": _cli("predict", "--ckpt_path={path}", "--data.init_args.predict_paths={path}"),
    "cli_export": _cli("export", "{path}", "--to", "{path}.export"),
    "cli_calibrate": _cli("calibrate", "{path}"),
    "load_classifier": _python(load_classifier),
    "load_backbone": _python(load_backbone),
    "calibrate_checkpoint": _python(calibrate_checkpoint),
    "trainer_ckpt_path": _python(_trainer_validate),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_checkpoint_is_one_error_naming_the_file_in_every_reader(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, reader: str
) -> None:
    if broken == "corrupt" and reader == "trainer_ckpt_path":
        pytest.skip("Lightning's own torch.load reads the file before any hook of ours runs")
    damage, what = BROKEN[broken]
    path = tmp_path / f"{broken}.ckpt"
    damage(saved, path)
    message = READERS[reader](path, capsys)
    assert message.startswith(f"{path}: {what}"), message
    assert "\n" not in message


def test_a_setting_the_model_no_longer_takes_is_refused_not_dropped(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.ckpt"
    _edited(lambda c: c[SETTINGS].update(unfreeze_schedule=[5, 10]))(saved, path)
    expected = (
        f"{path}: written with settings this version of ImageClassifier does not take (unfreeze_schedule); "
        "train it again with this version."
    )
    assert _cli("validate", "--ckpt_path={path}")(path, capsys) == expected
    assert _python(calibrate_checkpoint)(path, capsys) == expected
    assert load_classifier(path).class_names == list(CLASSES)  # the weights and classes are still readable


def test_paths_given_as_pathlib_objects_are_recorded_as_text(tmp_path: Path) -> None:
    """``pathlib.Path`` where a path is asked for (every path option of every datamodule and of the model) is
    recorded as text: ``torch.load(weights_only=True)``, which Lightning's LR finder and a resume use, refuses
    a pickled Path (it crashed ``find_lr`` after its sweep)."""
    from safetensors.torch import save_file

    from vision_transfer.datamodules import (
        CsvDataModule,
        FashionMNISTDataModule,
        ImageFolderDataModule,
        PreparedDataModule,
    )

    root = write_folder(tmp_path / "images")
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f"images/{c}/{c}_0.png,{c}\n" for c in CLASSES))
    base = tiny_data(root).data_config
    modules = [
        ImageFolderDataModule(root=root, data_config=base, predict_paths=[root / "circle"]),
        CsvDataModule(csv_path=table, data_config=base, predict_paths=root / "square"),
        FashionMNISTDataModule(root=tmp_path, data_config=base),
        PreparedDataModule(path=tmp_path, cache_dir=tmp_path, data_config=base),
    ]
    weights = tmp_path / "w.safetensors"
    save_file(tiny_model(modules[0]).backbone.state_dict(), weights)
    model = tiny_model(modules[0], weights=weights)
    for module in (*modules, model):
        path = tmp_path / f"{type(module).__name__}.pt"
        torch.save(dict(module.hparams), path)
        hparams = torch.load(path, weights_only=True)
        found = [k for k, v in hparams.items() if str(tmp_path) in str(v)]
        assert found, type(module).__name__  # the paths are there, as text
        assert all(isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v)) for v in
                   (hparams[k] for k in found)), hparams  # fmt: skip
    saved = model.save_standalone_checkpoint(tmp_path / "model.ckpt", modules[0])
    assert read_checkpoint(saved)[0].datamodule["init_args"]["root"] == str(root)
