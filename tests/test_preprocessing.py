"""Preprocessing: eval transforms equal timm's, arrays and float files decode like 8-bit files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from vision_transfer.backbones import DataConfig
from vision_transfer.data import load_image
from vision_transfer.errors import DataError
from vision_transfer.export.loading import Classifier

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- Classifier.preprocess on arrays: dtype and channels handled like files ---------------------------------------
@pytest.fixture(scope="module")
def classifier() -> Classifier:
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    config = DataConfig((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD)
    return Classifier("test_efficientnet", backbone, torch.nn.Linear(backbone.num_features, 2), config, ["a", "b"])


PHOTO = np.ascontiguousarray(skdata.chelsea()[::6, ::6])  # 50x76x3 uint8


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("uint16", PHOTO.astype(np.uint16) * 257 + 100),  # 100/257 rounds away; wraps mod 256 to +100
        ("float32 in [0, 1]", PHOTO.astype(np.float32) / 255),
        ("float64 in [0, 255]", PHOTO.astype(np.float64)),
        ("int64 in [0, 255]", PHOTO.astype(np.int64)),
        ("int32 16-bit values", PHOTO.astype(np.int32) * 257 + 100),
    ],
)
def test_predict_reads_array_dtypes_as_the_8bit_image(classifier: Classifier, name: str, array: np.ndarray) -> None:
    assert torch.equal(classifier.preprocess(array), classifier.preprocess(PHOTO)), name


def test_predict_scales_uint16_like_a_16bit_file(classifier: Classifier, tmp_path: Path) -> None:
    deep = (skdata.camera()[::8, ::8].astype(np.uint32) * 251).astype(np.uint16)  # the full 16-bit range, no x257
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert torch.equal(classifier.preprocess(deep), classifier.preprocess(tmp_path / "deep.png"))


def test_predict_reads_gray_and_bool_arrays(classifier: Classifier) -> None:
    gray = PHOTO[..., 1]
    as_rgb = np.repeat(gray[..., None], 3, axis=2)
    assert torch.equal(classifier.preprocess(gray), classifier.preprocess(as_rgb))
    assert torch.equal(classifier.preprocess(gray[..., None]), classifier.preprocess(as_rgb))
    mask = gray > 100
    assert torch.equal(classifier.preprocess(mask), classifier.preprocess(mask.astype(np.uint8) * 255))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_predict_composites_alpha_arrays_on_white_like_files(classifier: Classifier, tmp_path: Path, mode: str) -> None:
    alpha = np.linspace(0, 255, PHOTO.shape[0] * PHOTO.shape[1]).reshape(PHOTO.shape[:2]).astype(np.uint8)
    colour = PHOTO if mode == "RGBA" else PHOTO[..., :1]
    array = np.dstack([colour, alpha])
    Image.fromarray(array, mode).save(tmp_path / "alpha.png")
    from_file = classifier.preprocess(tmp_path / "alpha.png")
    assert torch.equal(classifier.preprocess(array), from_file)
    assert torch.equal(classifier.preprocess(array.astype(np.float32) / 255), from_file)
    assert not torch.equal(from_file, classifier.preprocess(np.ascontiguousarray(array[..., :-1])))  # alpha matters


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 3), -0.5, np.float32), r"float32.*\[-0\.5, -0\.5\]"),
        (np.full((8, 8, 3), 300.0), r"float64.*300"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), -3, np.int16), r"int16.*-3"),
        (np.full((8, 8, 3), 70_000, np.int64), r"int64.*70000"),
        (np.zeros((8, 8, 5), np.uint8), r"\(8, 8, 5\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"\(2, 8, 8, 3\)"),
        (np.zeros((8, 8, 3), np.complex64), "complex64"),
    ],
    ids=["negative", "float>255", "nan", "negative-int", "int>65535", "5-channels", "4d", "complex"],
)
def test_predict_refuses_arrays_it_cannot_read(classifier: Classifier, array: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        classifier.preprocess(array)


# -- float and 16-bit TIFF files ---------------------------------------------------------------------------
def test_float_tiff_in_unit_range_is_not_black(tmp_path: Path) -> None:
    gray = skdata.camera()[::8, ::8]
    Image.fromarray(gray.astype(np.float32) / 255, "F").save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    assert np.array_equal(load_image(tmp_path / "unit.tif"), np.repeat(gray[..., None], 3, axis=2))


def test_float_tiff_in_8bit_range_reads_as_8bit(tmp_path: Path) -> None:
    gray = skdata.camera()[::8, ::8]
    Image.fromarray(gray.astype(np.float32), "F").save(tmp_path / "byte.tif")
    assert np.array_equal(load_image(tmp_path / "byte.tif"), np.repeat(gray[..., None], 3, axis=2))


def test_float_tiff_out_of_range_is_refused_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 1000.0, np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(DataError, match=r"hdr\.tif.*1000"):
        load_image(tmp_path / "hdr.tif")


def test_16bit_tiff_is_scaled_from_its_full_range(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 257, 32768, 65535]], np.uint16)).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I;16"
    assert load_image(tmp_path / "deep.tif")[0, :, 0].tolist() == [0, 1, 128, 255]
