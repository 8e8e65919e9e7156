"""Decode any image file or array into an RGB uint8 array, or fail naming the input and the reason."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision_transfer.errors import DataError, ImageLoadError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Larger images are refused rather than decoded: a decompression bomb can exhaust memory.
MAX_PIXELS = 20_000 * 20_000 // 4


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to an HxWx3 uint8 array.

    16-bit and 32-bit integer grayscale are rescaled from their full range, float grayscale
    (mode F) follows :func:`array_to_rgb`'s float rule, transparency is composited onto white,
    palettes are expanded, CMYK is converted.

    Raises:
        DataError: a mode F image whose values are no image range (see :func:`array_to_rgb`).
    """
    if image.mode == "F":
        return array_to_rgb(np.asarray(image), name="mode F (float) image")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def array_to_rgb(array: np.ndarray, name: str = "image array") -> np.ndarray:
    """Read an image array the way files are read: HxWx3 uint8 out (HxWx3 uint8 in is returned as is).

    Values, by dtype: uint8 as is; bool as 0/255; uint16 scaled from its full range, like 16-bit
    files; other integers as 8-bit values when all lie in 0-255, else scaled from 0-65535 (PIL's
    rule for 32-bit integer files); floats in [0, 1] scaled by 255, floats in (1, 255] taken as
    8-bit values (so an almost black 0-255 float image, max <= 1, reads as a 0-1 one).
    Channels: HxW and HxWx1 gray, HxWx2 gray + alpha, HxWx3 RGB, HxWx4 RGBA; alpha is composited
    on white, as for files.

    Args:
        array: the image.
        name: what to call it in an error message.

    Raises:
        DataError: a shape, dtype or value range that is no image's (negative, NaN, floats > 255,
            integers > 65535); the message names the shape, dtype and range.
    """
    array = np.asarray(array)
    what = f"{name} of shape {array.shape} and dtype {array.dtype}"
    channels = 1 if array.ndim == 2 else array.shape[-1] if array.ndim == 3 else 0
    if channels not in (1, 2, 3, 4) or array.size == 0:
        raise DataError(f"{what}: expected HxW gray, HxWx1, HxWx2 (gray + alpha), HxWx3 (RGB) or HxWx4 (RGBA).")
    array = _to_uint8(array, what)
    if array.ndim == 3 and channels == 3:
        return array
    if channels in (1, 2):  # gray, or gray + alpha: composite as files are, then repeat
        array = array.reshape(*array.shape[:2], channels)
        if channels == 1:
            return np.repeat(array, 3, axis=2)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))  # uint8 HxWx2 -> LA, HxWx4 -> RGBA


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Values of any supported dtype -> uint8, by the rules of :func:`array_to_rgb`."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        return _scale(array, 65535.0)
    kind = array.dtype.kind
    if kind not in "iuf":
        raise DataError(f"{what}: not an image dtype; use uint8 (0-255), uint16 (0-65535) or float (0-1 or 0-255).")
    if kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{what}: has NaN or infinite values; replace them before predicting.")
    low, high = array.min(), array.max()
    values = f"values in [{low:g}, {high:g}]"
    if low < 0:
        raise DataError(f"{what}: {values}; negative values are no image's; rescale to 0-255 (or 0-1 for floats).")
    if kind == "f":
        if high > 255:
            raise DataError(f"{what}: {values}; floats must be in 0-1 or 0-255, rescale the image to one of them.")
        return _scale(array, 1.0 if high <= 1 else 255.0)
    if high > 65535:
        raise DataError(f"{what}: {values}; integers must be 8-bit (0-255) or 16-bit (0-65535), rescale first.")
    return _scale(array, 255.0 if high <= 255 else 65535.0)


def _scale(array: np.ndarray, top: float) -> np.ndarray:
    """``array / top`` onto 0-255, rounded to nearest."""
    if top == 255.0 and array.dtype.kind in "iu":  # 8-bit values in a wider integer type: exact
        return array.astype(np.uint8)
    return np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


Decode = Literal["full", "reduced", "fast"]
DECODES: tuple[str, ...] = ("full", "reduced", "fast")
_EXIF_ORIENTATION = 0x0112


def load_image(
    path: str | Path, *, min_side: int | None = None, decode: Decode = "full", data: bytes | None = None
) -> np.ndarray:
    """Read an image file into an HxWx3 uint8 RGB array (EXIF orientation applied).

    Args:
        path: the file (with ``data``: only its name, for messages).
        min_side: the smallest shorter side the caller needs; ``decode`` ``reduced`` or ``fast`` may
            then decode a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling), never below it.
        decode: ``full`` decodes every pixel (PIL); ``reduced`` lets PIL's JPEG ``draft`` scale down
            to ``min_side``; ``fast``: the same scaling and pixels through simplejpeg (the ``[fast]``
            extra; less overhead than PIL), PIL for other formats and EXIF-rotated JPEGs.
        data: the encoded file's bytes, already read (from a dataset's records or chunks).
    """
    path = Path(path)
    if decode == "fast" and min_side is not None:
        fast = _decode_simplejpeg(path, data, min_side)
        if fast is not None:
            return fast
    with _open(path, data) as image:
        if decode != "full" and min_side is not None and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))  # both sides >= min_side, so the shorter one is too
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
        return to_rgb(image)


def _decode_simplejpeg(path: Path, data: bytes | None, min_side: int) -> np.ndarray | None:
    """simplejpeg's decode of a JPEG without EXIF rotation, its shorter side >= ``min_side``; None: use PIL."""
    try:
        import simplejpeg
    except ImportError as e:
        raise DataError("decode='fast' needs simplejpeg: pip install 'vision-transfer[fast]'") from e
    if data is None:
        try:
            data = path.read_bytes()
        except OSError:
            return None  # PIL's path names the problem
    if not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if width * height > MAX_PIXELS or width < 1 or height < 1:
            return None
        with Image.open(io.BytesIO(data)) as header:  # reads the header only: the EXIF rotation
            if header.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
        factor = 1  # 1/2, 1/4, 1/8 as PIL's draft scales: libjpeg's other M/8 factors resample worse
        while factor < 8 and min(height, width) // (2 * factor) >= min_side:
            factor *= 2
        return simplejpeg.decode_jpeg(  # type: ignore[no-any-return]
            data, colorspace="RGB", fastdct=False, fastupsample=False,  # exact: PIL's pixels (fast*: +7%, biased)
            min_height=-(-height // factor), min_width=-(-width // factor),
        )  # fmt: skip
    except (ValueError, OSError, SyntaxError):  # CMYK, arithmetic coding, corrupt: PIL decides
        return None


def check_image_header(path: str | Path, data: bytes | None = None) -> None:
    """Cheap check that ``path`` (or its bytes, ``data``) opens as an image of a sane size (reads only the header)."""
    with _open(Path(path), data):
        pass


@contextmanager
def _open(path: Path, data: bytes | None = None) -> Iterator[Image.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                _check_size(path, image.size)
                yield image
    except ImageLoadError:
        raise
    except DataError as e:  # decoded, but its values are no image's (a float TIFF out of range)
        raise ImageLoadError(path, str(e)) from e
    except FileNotFoundError as e:
        raise ImageLoadError(path, "file not found.") from e
    except UnidentifiedImageError as e:
        size = len(data) if data is not None else path.stat().st_size
        reason = "empty file (0 bytes)" if size == 0 else "not an image PIL can decode"
        raise ImageLoadError(path, f"{reason}.") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"too many pixels; refused by the decompression-bomb guard ({e}).") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(path, f"corrupt or truncated image ({e}).") from e


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(path, f"{width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit.")
    if width < 1 or height < 1:
        raise ImageLoadError(path, f"image has no pixels ({width}x{height}).")
