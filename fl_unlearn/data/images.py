"""Decode radiograph files (JPEG/PNG, 8- or 16-bit) into square 8-bit grayscale arrays."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from fl_unlearn.errors import ConfigError, DataError

# PIL reports a damaged file through many exception types, depending on the codec and where it breaks.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
# Modes holding more than 8 bits per pixel (16-bit PNGs open as "I;16"); they are rescaled, not clipped.
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Read one image as uint8 ``[size, size]`` grayscale.

    The shorter side is resized to ``size`` (bilinear, anti-aliased, as torchvision's ``Resize``)
    and the longer side center-cropped, so non-square radiographs keep their aspect ratio.

    Raises
    ------
    DataError
        If the file is missing or cannot be decoded.
    """
    _check_size(size)
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise DataError(f"image file {path} is not a file")
        raise DataError(
            f"image file {path} is missing; check the dataset root, or list every missing file "
            "with fl_unlearn.data.loaders.missing_images()"
        )
    try:
        with Image.open(path) as img:
            # JPEGs can decode at 1/2..1/8 scale almost for free; keeping >= 2x the target size
            # leaves the final resize enough pixels to anti-alias properly.
            img.draft("L", (2 * size, 2 * size))
            img.load()
            gray = _to_gray8(img)
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"image file {path} cannot be decoded ({type(exc).__name__}: {exc}); "
            "re-download it or remove it from the dataset"
        ) from exc
    return _resize_center_crop(gray, size)


def decode_images(paths: Iterable[str | Path], size: int) -> np.ndarray:
    """Read several images into one uint8 ``[N, size, size]`` array; the first bad file raises."""
    _check_size(size)
    paths = list(paths)
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_image(path, size)
    return out


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"image size must be a positive integer, got {size!r}")


def _to_gray8(img: Image.Image) -> Image.Image:
    if img.mode not in _WIDE_MODES:
        return img.convert("L")
    # The bit depth actually used (10, 12 or 16 bits) is not recorded in the PNG, so stretch the
    # image's own range to 0..255 instead of assuming a full 16-bit range (which would look black).
    pixels = np.asarray(img, dtype=np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.rint((pixels - low) * scale).astype(np.uint8))


def _resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    width, height = img.size
    # Same rounding as torchvision Resize(int) + CenterCrop, so arrays match its pipelines.
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    img = img.resize(new_size, Image.Resampling.BILINEAR)
    left = round((new_size[0] - size) / 2.0)
    top = round((new_size[1] - size) / 2.0)
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
