"""Data: image modes, sources, splits, transforms and the errors bad input gets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CLASSES
from vision_transfer.backbones import DataConfig
from vision_transfer.data import (
    check_image_header,
    create_eval_transform,
    create_train_transform,
    list_predict_files,
    load_image,
    read_csv,
    read_fashion_mnist,
    read_image_folder,
    stratified_split,
)
from vision_transfer.errors import DataError, ImageLoadError

CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)


# -- image modes ---------------------------------------------------------------------------
def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    Image.fromarray(np.full((5, 6), 77, np.uint8), "L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.shape == (5, 6, 3) and image.dtype == np.uint8 and (image == 77).all()


def test_16bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png")
    assert image[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red, transparent pixels become white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image[0, 0].tolist() == [255, 0, 0] and image[1, 1].tolist() == [255, 255, 255]


def test_palette_and_cmyk_images(tmp_path: Path) -> None:
    rgb = Image.fromarray(np.array([[[10, 200, 30], [250, 5, 5]]], np.uint8))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").tolist() == [[[10, 200, 30], [250, 5, 5]]]
    rgb.convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    cmyk = load_image(tmp_path / "c.jpg")
    assert cmyk.shape == (1, 2, 3) and abs(int(cmyk[0, 0, 1]) - 200) < 20


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"this is text, not a picture", "not an image"), (None, "corrupt or truncated")],
)
def test_bad_image_files_name_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.png"
    if content is None:  # a real JPEG cut in half: the header is fine, decoding fails
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "x.jpg")
        path = tmp_path / "truncated.jpg"
        path.write_bytes((tmp_path / "x.jpg").read_bytes()[:600])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=rf"{path.name}: {message}"):
        load_image(path)
    if content is not None:
        with pytest.raises(ImageLoadError, match=path.name):
            check_image_header(path)


# -- sources -------------------------------------------------------------------------------
def test_image_folder_without_splits(image_folder: Path) -> None:
    source = read_image_folder(image_folder)
    assert source.class_names == sorted(CLASSES)
    assert list(source.splits) == ["train"] and len(source.splits["train"]) == 24


def test_image_folder_with_split_folders(split_folder: Path) -> None:
    source = read_image_folder(split_folder)
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 24, "val": 9, "test": 9}


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "empty_class").mkdir()
    with pytest.raises(DataError, match="with no images: empty_class"):
        read_image_folder(image_folder)


def test_csv_paths_are_relative_to_the_csv(csv_dataset: Path) -> None:
    source = read_csv(csv_dataset)
    assert source.class_names == sorted(CLASSES)
    assert all(Path(p).is_file() for p in source.splits["train"].items)


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_errors_name_file_line_and_column(image_folder: Path) -> None:
    first = next(image_folder.rglob("*.png")).relative_to(image_folder).as_posix()
    with pytest.raises(DataError, match=r"missing column\(s\) label; found path, class"):
        read_csv(_write_csv(image_folder / "a.csv", [["path", "class"], [first, "x"]]))
    with pytest.raises(DataError, match=r"line 3: .*nope\.png"):
        read_csv(_write_csv(image_folder / "b.csv", [["path", "label"], [first, "x"], ["nope.png", "y"]]))
    with pytest.raises(DataError, match="only a header"):
        read_csv(_write_csv(image_folder / "c.csv", [["path", "label"]]))


def test_csv_split_column(image_folder: Path) -> None:
    files = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    rows = [["path", "label", "split"]] + [
        [f, f.split("/")[0], "test" if i % 4 == 0 else "train"] for i, f in enumerate(files)
    ]
    source = read_csv(_write_csv(image_folder / "s.csv", rows))
    assert len(source.splits["test"]) == 6 and len(source.splits["train"]) == 18


def test_stratified_split_is_seeded_disjoint_and_covers_each_class() -> None:
    labels = np.repeat(np.arange(4), [50, 20, 7, 3])
    train, val, test = stratified_split(labels, [0.2, 0.1], seed=3)
    again = stratified_split(labels, [0.2, 0.1], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert len(set(train) | set(val) | set(test)) == len(labels) == len(train) + len(val) + len(test)
    for part in (train, val, test):
        assert set(labels[part]) == {0, 1, 2, 3}
    assert not np.array_equal(stratified_split(labels, [0.2, 0.1], seed=4)[1], val)


def test_fashion_mnist_from_the_debian_package() -> None:
    source = read_fashion_mnist()
    train, test = source.splits["train"], source.splits["test"]
    assert len(train) == 60000 and len(test) == 10000 and train.items.shape[1:] == (28, 28)
    assert source.class_names[9] == "Ankle boot" and np.bincount(test.labels).tolist() == [1000] * 10


def test_fashion_mnist_missing_root_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        read_fashion_mnist(tmp_path)


def test_predict_inputs_expand_folders_and_lists(image_folder: Path) -> None:
    listing = image_folder / "list.txt"
    listing.write_text("circle/circle_0.png\nsquare/square_1.png\n")
    assert len(list_predict_files(str(image_folder))) == 24
    assert [Path(p).name for p in list_predict_files([str(listing)])] == ["circle_0.png", "square_1.png"]
    with pytest.raises(DataError, match="not a file"):
        list_predict_files("/nonexistent")


# -- transforms ----------------------------------------------------------------------------
def test_transforms_follow_the_data_config() -> None:
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
    for transform in (create_train_transform(CONFIG), create_eval_transform(CONFIG)):
        out = transform(image=image)["image"]
        assert tuple(out.shape) == (3, 32, 32) and str(out.dtype) == "torch.uint8"


def test_eval_transform_is_resize_then_center_crop() -> None:
    # crop_pct 0.5 on a 64 px target: shorter side to 128, then the central 64x64.
    config = DataConfig(input_size=(3, 64, 64), mean=(0,) * 3, std=(1,) * 3, crop_pct=0.5, interpolation="nearest")
    image = np.zeros((128, 256, 3), np.uint8)
    image[32:96, 96:160] = 255  # exactly the central crop
    out = create_eval_transform(config)(image=image)["image"]
    assert out.float().mean() == 255


def test_augmentation_is_reproducible_from_the_torch_seed(image_folder: Path) -> None:
    import torch

    from vision_transfer.data import ImageDataset, read_image_folder

    samples = read_image_folder(image_folder).splits["train"]

    def first_views(seed: int) -> list:
        torch.manual_seed(seed)
        dataset = ImageDataset(samples, create_train_transform(CONFIG))
        return [dataset[i][0] for i in range(4)]

    same = zip(first_views(0), first_views(0), strict=True)
    assert all(torch.equal(a, b) for a, b in same)
    assert not all(torch.equal(a, b) for a, b in zip(first_views(0), first_views(1), strict=True))


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.6, 0.6), (0.7, 0.3)])
def test_split_fractions_that_leave_nothing_to_train_on_are_refused(
    image_folder: Path, val: float, test: float
) -> None:
    from vision_transfer.datamodules import ImageFolderDataModule
    from vision_transfer.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"val_fraction={val} \+ test_fraction={test} = .*must be < 1"):
        ImageFolderDataModule(str(image_folder), val_fraction=val, test_fraction=test)


@pytest.mark.parametrize(("val", "test"), [(0.1, 0.1), (0.45, 0.45), (0.6, 0.35), (0.0, 0.9)])
@pytest.mark.parametrize("per_class", [1, 2, 3, 7])
def test_every_class_keeps_a_training_sample_and_splits_are_disjoint(val: float, test: float, per_class: int) -> None:
    labels = np.repeat(np.arange(4), per_class)
    train, val_part, test_part = stratified_split(labels, [val, test], seed=0)
    assert set(labels[train]) == {0, 1, 2, 3}
    assert (
        not (set(train) & set(val_part)) and not (set(train) & set(test_part)) and not (set(val_part) & set(test_part))
    )
    assert len(train) + len(val_part) + len(test_part) == len(labels)
