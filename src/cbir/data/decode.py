"""Robust image decoding: every file becomes an RGB ``PIL.Image`` or a :class:`DecodeError`.

Retrieval jobs run over collections nobody curated, so decoding must never be the
thing that ends a 100,000-image run. This module owns every decision about turning
bytes into pixels: JPEG draft-mode (decode at 1/2, 1/4 or 1/8 scale when the model
input is much smaller), EXIF orientation, conversion of every Pillow mode to RGB,
and a pixel limit that replaces Pillow's process-wide decompression-bomb check with
a per-call, configurable one that raises a normal, reportable error.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cbir.errors import CbirError

# Pillow's own bomb check is global state and raises from deep inside ``open``; we
# enforce our own limit on the header's size before any pixel is decoded instead.
Image.MAX_IMAGE_PIXELS = None

#: Default limit on width*height (about 16k x 6k). Larger files are skipped and reported.
DEFAULT_MAX_PIXELS = 100_000_000

#: Extensions treated as images when walking folders.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
)

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

ImageSource = str | os.PathLike | bytes | io.IOBase
#: Maps the upright (width, height) of an image to the size the model will resize it to.
TargetSize = Callable[[int, int], tuple[int, int]]


class DecodeError(CbirError):
    """An image that cannot be turned into pixels; carries the path and a human reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has one of the image extensions we index."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<bytes>" if isinstance(source, bytes) else "<stream>"


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not cost us the image
        return 1


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images into 8 bits instead of clipping them."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / hi if hi > 255.0 else 1.0)
        arr8 = np.clip(arr * scale, 0, 255).astype(np.uint8)
    else:
        arr = arr.astype(np.int64)
        hi = int(arr.max()) if arr.size else 0
        if img.mode.startswith("I;16") or hi > 255:
            arr8 = np.clip(arr // 257 if hi <= 65535 else arr * 255 // max(hi, 1), 0, 255)
        else:
            arr8 = np.clip(arr, 0, 255)
        arr8 = arr8.astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white, not black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(img)
    return img.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: TargetSize | None = None,
) -> Image.Image:
    """Decode ``source`` to an upright RGB image.

    ``target_size`` tells the decoder how large the image will be after resizing, so a
    JPEG can be decoded directly at the smallest DCT scale that is still at least that
    large (``Image.draft``), which is several times faster for camera photos. Any
    failure, including a truncated file or one over ``max_pixels``, raises
    :class:`DecodeError` with a reason a person can act on.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise DecodeError(name, "empty file (0 bytes)")
        except OSError as exc:
            raise DecodeError(name, f"cannot read file: {exc.strerror or exc}") from exc
    elif isinstance(source, bytes) and not source:
        raise DecodeError(name, "empty file (0 bytes)")
    try:
        img = _open(source)
    except UnidentifiedImageError as exc:
        raise DecodeError(name, "not an image (unrecognised format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError(name, f"cannot open: {exc}") from exc
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise DecodeError(name, f"invalid dimensions {width}x{height}")
        if max_pixels is not None and width * height > max_pixels:
            raise DecodeError(
                name,
                f"too large: {width}x{height} = {width * height:,} pixels "
                f"exceeds the limit of {max_pixels:,}",
            )
        orientation = _exif_orientation(img)
        if target_size is not None and img.format == "JPEG":
            up_w, up_h = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
            tw, th = target_size(up_w, up_h)
            if orientation in _SWAPPING_ORIENTATIONS:
                tw, th = th, tw
            draft_mode = "RGB" if img.mode in ("RGB", "YCbCr") else None
            img.draft(draft_mode, (max(1, tw), max(1, th)))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except DecodeError:
        raise
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason:
            reason = f"truncated or corrupt image data ({reason})"
        raise DecodeError(name, reason) from exc
    except Exception as exc:  # decoder plug-ins raise anything; never kill the job
        raise DecodeError(name, f"{type(exc).__name__}: {exc}") from exc


def image_size(source: ImageSource) -> tuple[int, int]:
    """Upright (width, height) from the header only, without decoding pixels."""
    name = _describe(source)
    try:
        with _open(source) as img:
            w, h = img.size
            if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
                w, h = h, w
            return w, h
    except Exception as exc:
        raise DecodeError(name, f"cannot read header: {exc}") from exc
