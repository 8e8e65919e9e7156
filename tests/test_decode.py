"""Decoding less: JPEGs decoded at reduced size (PIL's draft, simplejpeg) stay within a tested
tolerance of timm's full-decode eval pipeline, never below the size a transform needs, and keep
EXIF orientation, gray and CMYK files right; other formats are untouched."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from vision_transfer.backbones import DataConfig
from vision_transfer.data import create_eval_transform, load_image
from vision_transfer.data.images import DECODES
from vision_transfer.data.sources import Samples
from vision_transfer.data.transforms import CROP_MODES, decode_side
from vision_transfer.datamodules import ImageFolderDataModule
from vision_transfer.errors import ConfigError

# Mean absolute difference, in 0-255 levels, allowed between a reduced decode's eval tensor and a full
# decode's (what timm's pipeline sees). Measured on the photos below (2026-12-07): up to
# 1.74 at 64 px (fast: the same pixels); timm's own bicubic-vs-bilinear choice moves the same tensors by 0.9-2.9.
EVAL_TOLERANCE = 2.0
MEAN_SHIFT = 0.5  # and no brightness drift: the mean of the difference stays near 0


def _config(
    size: int = 64, crop_mode: str = "center", crop_pct: float = 0.875, height: int | None = None
) -> DataConfig:
    return DataConfig(
        input_size=(3, height or size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=crop_pct,
        crop_mode=crop_mode,
    )  # fmt: skip


PHOTOS = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos as JPEGs at 2x and 3x their size (the sizes where DCT scaling kicks in at 64-224 px)."""
    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name, load in PHOTOS.items():
        image = Image.fromarray(load())
        for factor in (1, 2):
            path = folder / f"{name}_{factor}.jpg"
            image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC).save(path, quality=90)
            out[f"{name}_{factor}"] = path
    return out


def _eval(path: Path, config: DataConfig, decode: str) -> torch.Tensor:
    side = decode_side(config)
    return create_eval_transform(config)(image=load_image(path, min_side=side, decode=decode))["image"].float()  # type: ignore[arg-type]


@pytest.mark.parametrize("decode", ["reduced", "fast"])
@pytest.mark.parametrize(
    "config",
    [_config(64, mode) for mode in CROP_MODES] + [_config(96, crop_pct=1.0), _config(64, height=48), _config(224)],
    ids=[*CROP_MODES, "crop_pct1", "non_square", "224"],
)
def test_reduced_decoding_matches_timms_full_decode_eval(
    photos: dict[str, Path], decode: str, config: DataConfig
) -> None:
    reduced_somewhere = False
    for path in photos.values():
        full, reduced = _eval(path, config, "full"), _eval(path, config, decode)
        assert full.shape == reduced.shape
        difference = reduced - full
        assert difference.abs().mean() <= EVAL_TOLERANCE, (path.name, float(difference.abs().mean()))
        assert abs(float(difference.mean())) <= MEAN_SHIFT, (path.name, float(difference.mean()))
        decoded = load_image(path, min_side=decode_side(config), decode=decode)  # type: ignore[arg-type]
        reduced_somewhere |= decoded.shape != load_image(path).shape
    side = decode_side(config)
    if side is not None and side * 2 <= 600:  # the photos' shorter sides are 300-512 (x1) and 600-1024 (x2)
        assert reduced_somewhere, "no photo was decoded at reduced size: the test would not test anything"


@pytest.mark.parametrize("decode", ["reduced", "fast"])
@pytest.mark.parametrize("min_side", [1, 37, 64, 150, 299, 300, 301, 1000])
def test_a_reduced_decode_never_goes_below_the_side_asked_for(
    photos: dict[str, Path], decode: str, min_side: int
) -> None:
    for path in photos.values():
        full = load_image(path)
        out = load_image(path, min_side=min_side, decode=decode)  # type: ignore[arg-type]
        assert min(out.shape[:2]) >= min(min_side, min(full.shape[:2]))
        if min(full.shape[:2]) >= 2 * min_side:  # room for at least 1/2: it is taken
            assert min(out.shape[:2]) < min(full.shape[:2])
        if decode == "fast":  # simplejpeg scales and decodes exactly as PIL's draft does: the same pixels
            assert np.array_equal(out, load_image(path, min_side=min_side, decode="reduced"))
        # the aspect ratio is kept (to the 1/8 rounding of libjpeg's scaled sizes)
        assert out.shape[1] / out.shape[0] == pytest.approx(full.shape[1] / full.shape[0], rel=0.05)


@pytest.mark.parametrize("scale_min", [0.08, 0.2, 0.35, 0.6, 1.0])
@pytest.mark.parametrize("size", [32, 64, 224, 384])
def test_the_training_side_keeps_the_smallest_random_crop_at_the_input_size(size: int, scale_min: float) -> None:
    side = decode_side(_config(size), scale_min)
    # the smallest crop of a side x side image: scale_min of the area at aspect 4/3 (albumentations' extreme)
    area = scale_min * side * side
    assert math.sqrt(area * 3 / 4) >= size - 1e-6
    assert decode_side(_config(size)) == 2 * math.ceil(size / 0.875)
    assert decode_side(_config(size, "border")) is None  # its padded size follows libjpeg's rounding: full decode


@pytest.mark.parametrize("decode", DECODES)
def test_exif_rotation_gray_and_cmyk_jpegs_decode_alike(tmp_path: Path, decode: str) -> None:
    photo = Image.fromarray(skdata.astronaut()).resize((400, 300))
    cases = {}
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.save(rotated, quality=95, exif=exif)
    cases["rotated"] = rotated
    photo.convert("L").save(tmp_path / "gray.jpg", quality=95)
    cases["gray"] = tmp_path / "gray.jpg"
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cases["cmyk"] = tmp_path / "cmyk.jpg"
    for name, path in cases.items():
        full = load_image(path)
        out = load_image(path, min_side=60, decode=decode)  # type: ignore[arg-type]
        assert out.dtype == np.uint8 and out.shape[2] == 3
        assert (out.shape[0] > out.shape[1]) == (full.shape[0] > full.shape[1]), name  # the same orientation
        small = np.asarray(Image.fromarray(full).resize(out.shape[1::-1], Image.Resampling.BOX), dtype=np.float64)
        assert np.abs(out - small).mean() < 6, name  # the same picture, however it was scaled


@pytest.mark.parametrize("decode", DECODES)
def test_other_formats_and_arrays_decode_in_full_and_unchanged(tmp_path: Path, decode: str) -> None:
    photo = Image.fromarray(skdata.coffee())
    photo.save(tmp_path / "coffee.png")
    assert np.array_equal(load_image(tmp_path / "coffee.png", min_side=30, decode=decode), np.asarray(photo))  # type: ignore[arg-type]
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    from_bytes = load_image("record 7", data=buffer.getvalue(), min_side=30, decode=decode)  # type: ignore[arg-type]
    assert min(from_bytes.shape[:2]) >= 30
    array = skdata.camera()
    samples = Samples(array[None], np.zeros(1, dtype=np.int64), ["a:0"])
    assert np.array_equal(samples.image(0, min_side=30, decode=decode), np.repeat(array[..., None], 3, axis=2))  # type: ignore[arg-type]


def test_the_datamodule_decodes_as_told_on_every_split_and_predict(photos: dict[str, Path], tmp_path: Path) -> None:
    """``decode`` reaches train, val, test and predict (the sizes asked for are the transform's)."""
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for name, path in photos.items():
            (root / c / f"{name}.jpg").write_bytes(path.read_bytes())
    config = _config(64)
    seen: dict[str, dict[str, set[int]]] = {}
    for decode in DECODES:
        data = ImageFolderDataModule(
            str(root), data_config=config, decode=decode, val_fraction=0.25, test_fraction=0.25, num_workers=0,
            predict_paths=str(root),
        )  # fmt: skip
        data.setup("fit")
        data.setup("predict")
        datasets = {**data.datasets, "predict": data.predict_dataloader().dataset}
        sides: dict[str, set[int]] = {}
        for split, dataset in datasets.items():
            assert dataset.decode == decode  # type: ignore[attr-defined]
            samples = dataset.samples  # type: ignore[attr-defined]
            sides[split] = {
                min(samples.image(i, min_side=dataset.min_side, decode=decode).shape[:2])  # type: ignore[attr-defined]
                for i in range(len(samples))
            }
        seen[decode] = sides
        assert data.datasets["train"].min_side == decode_side(config, 0.35)  # type: ignore[attr-defined]
        assert data.datasets["val"].min_side == decode_side(config)  # type: ignore[attr-defined]
    assert seen["reduced"]["val"] != seen["full"]["val"]  # the option acts on eval splits
    assert seen["reduced"]["predict"] != seen["full"]["predict"]
    assert max(seen["reduced"]["train"]) >= min(seen["reduced"]["val"])  # training keeps more pixels


def test_an_unknown_decode_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="decode='turbo'"):
        ImageFolderDataModule("anywhere", decode="turbo")  # type: ignore[arg-type]


def test_feature_extraction_decodes_in_full_and_refuses_fast(image_folder: Path, tmp_path: Path) -> None:
    """extract, probe, inspect and the benchmark decode in full (what the cache records): decode=fast is refused
    there by name, not ignored (cache_features: tests/test_option_paths.py)."""
    from tests.test_cli import run_cli
    from vision_transfer.app.protocols import extract_datamodule
    from vision_transfer.datamodules import ImageFolderDataModule

    with pytest.raises(ConfigError, match="decode='fast': feature extraction decodes every image in full"):
        extract_datamodule(ImageFolderDataModule(str(image_folder), decode="fast"), "test_efficientnet", "none")
    args = ["extract", "--backbone=test_efficientnet", "--weights=none", "--image_size=32",
            "--data=ImageFolderDataModule", f"--data.init_args.root={image_folder}", "--data.init_args.decode=fast",
            f"--cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert run_cli(args) == 2 and not (tmp_path / "cache").exists()  # refused before anything was written
