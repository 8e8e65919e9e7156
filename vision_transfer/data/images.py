"""Decode any image file into an RGB uint8 array, or fail naming the file and the reason."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision_transfer.errors import ImageLoadError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# Larger images are refused rather than decoded: a decompression bomb can exhaust memory.
MAX_PIXELS = 20_000 * 20_000 // 4


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to an HxWx3 uint8 array.

    16-bit and 32-bit grayscale are rescaled from their full range, transparency is composited
    onto white, palettes are expanded, CMYK is converted.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
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
    return np.asarray(image.convert("RGB"))


def load_image(path: str | Path) -> np.ndarray:
    """Read ``path`` into an HxWx3 uint8 RGB array (EXIF orientation applied)."""
    with _open(Path(path)) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image) or image)


def check_image_header(path: str | Path) -> None:
    """Cheap check that ``path`` opens as an image of a sane size (reads only the header)."""
    with _open(Path(path)):
        pass


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(path, image.size)
                yield image
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(path, "file not found.") from e
    except UnidentifiedImageError as e:
        reason = "empty file (0 bytes)" if path.stat().st_size == 0 else "not an image PIL can decode"
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
