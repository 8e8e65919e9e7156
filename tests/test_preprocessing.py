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
from vision_transfer.data import create_eval_transform, load_image, stratified_subset
from vision_transfer.data.transforms import Normalize
from vision_transfer.errors import DataError
from vision_transfer.export.loading import Classifier

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photos() -> dict[str, np.ndarray]:
    """Real photos of many sizes and aspect ratios, all as HxWx3 uint8 (as ImageDataset passes them)."""
    chelsea, coffee, astronaut, rocket = skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()
    photos = {
        "chelsea 300x451": chelsea,
        "coffee 400x600": coffee,
        "astronaut 512x512": astronaut,
        "rocket 427x640": rocket,
        "camera 512x512 gray": np.repeat(skdata.camera()[..., None], 3, axis=2),
        "coffee 333x500": coffee[30:363, 50:550],
        "rocket 257x383": rocket[100:357, 200:583],
        "astronaut 500x333": astronaut[5:505, 100:433],
        "chelsea 31x47": chelsea[150:181, 200:247],
    }
    return {name: np.ascontiguousarray(image) for name, image in photos.items()}


PHOTOS = _photos()


def _timm_uint8(config: DataConfig, image: np.ndarray) -> torch.Tensor:
    """What a user with plain timm feeds the model, mapped back from normalised floats to 0-255."""
    transform = timm.data.create_transform(
        input_size=config.input_size,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
        crop_pct=config.crop_pct,
        crop_mode=config.crop_mode,
    )
    x = transform(Image.fromarray(image).convert("RGB"))
    return (x * torch.tensor(config.std).view(3, 1, 1) + torch.tensor(config.mean).view(3, 1, 1)) * 255


# -- eval transform == timm's eval transform ----------------------------------------------------------
@pytest.mark.parametrize("input_size", [(3, 224, 224), (3, 96, 160), (3, 65, 48)], ids=lambda s: f"{s[1]}x{s[2]}")
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_eval_transform_equals_timm_eval_transform(
    crop_mode: str, crop_pct: float, interpolation: str, input_size: tuple[int, int, int]
) -> None:
    config = DataConfig(input_size, IMAGENET_MEAN, IMAGENET_STD, interpolation, crop_pct, crop_mode)
    transform = create_eval_transform(config)
    for name, image in PHOTOS.items():
        ours = transform(image=image)["image"]
        reference = _timm_uint8(config, image)
        assert ours.dtype == torch.uint8, name
        assert tuple(ours.shape) == tuple(reference.shape) == input_size, name
        diff = (ours.float() - reference).abs().max().item()
        assert diff <= 1.0, f"{name}: {diff:.0f} grey levels from timm's eval transform"


def test_eval_pipeline_gives_timms_logits() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(100)  # random init gives logits ~0.01 apart: spread them to ~1
    config = DataConfig.from_model(model)
    assert (config.crop_pct, config.input_size) == (0.95, (3, 160, 160))  # not the defaults: the config is used
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    ours_transform, normalize = create_eval_transform(config), Normalize(config)
    images = list(PHOTOS.values())
    with torch.inference_mode():
        theirs = model(torch.stack([timm_transform(Image.fromarray(image)) for image in images]))
        ours = model(normalize(torch.stack([ours_transform(image=image)["image"] for image in images])))
    assert theirs.std(dim=0).min() > 0.3  # the images give distinguishable logits: the check has teeth
    assert torch.allclose(ours, theirs, atol=1e-3), (ours - theirs).abs().max()
    assert torch.allclose(ours.softmax(1), theirs.softmax(1), atol=1e-3)


def test_eval_transform_takes_gray_and_rgba_arrays_like_files(tmp_path: Path) -> None:
    config = DataConfig((3, 32, 48), IMAGENET_MEAN, IMAGENET_STD)
    transform = create_eval_transform(config)
    gray = skdata.camera()[::8, ::8]
    assert torch.equal(transform(image=gray)["image"], transform(image=np.repeat(gray[..., None], 3, axis=2))["image"])
    colour = skdata.chelsea()[::4, ::4]
    rgba = np.dstack([colour, np.linspace(0, 255, colour[..., 0].size).reshape(colour.shape[:2]).astype(np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert torch.equal(transform(image=rgba)["image"], transform(image=load_image(tmp_path / "rgba.png"))["image"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("crop_mode", "centre", "crop_mode='centre'"), ("interpolation", "area", "interpolation='area'")],
)
def test_eval_transform_refuses_settings_timm_does_not_know(field: str, value: str, message: str) -> None:
    config = DataConfig((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, **{field: value})
    with pytest.raises(DataError, match=message):
        create_eval_transform(config)


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


# -- stratified_subset ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("counts", "size"),
    [([10] * 10, 5), ([10] * 10, 10), ([10] * 3, 10), ([1000, 1, 1], 3), ([50, 30, 7, 2, 1], 17), ([4, 4], 7)],
)
def test_stratified_subset_returns_exactly_size(counts: list[int], size: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(0).shuffle(labels)
    subset = stratified_subset(labels, size, seed=3)
    assert len(subset) == size and len(np.unique(subset)) == size
    assert np.array_equal(subset, stratified_subset(labels, size, seed=3))
    taken = np.bincount(labels[subset], minlength=len(counts))
    if size >= len(counts):
        assert (taken >= 1).all()  # every class is represented
        assert np.abs(taken - np.array(counts) * size / len(labels)).max() < 2  # and in proportion
    else:
        assert taken.max() == 1  # one each for a seeded choice of classes
        other_seeds = {tuple(np.flatnonzero(np.bincount(labels[stratified_subset(labels, size, s)]))) for s in range(8)}
        assert len(other_seeds) > 1


def test_stratified_subset_of_zero_is_empty_and_of_a_negative_size_refused() -> None:
    labels = np.repeat(np.arange(3), 4)
    assert stratified_subset(labels, 0, seed=0).tolist() == []
    with pytest.raises(DataError, match="subset size -1"):
        stratified_subset(labels, -1, seed=0)
