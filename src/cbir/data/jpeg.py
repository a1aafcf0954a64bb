"""JPEG pixels through libjpeg-turbo's own API (simplejpeg): Pillow's pixels, in half the time.

Pillow decodes JPEG with libjpeg-turbo too, but through the classic libjpeg interface and
its own image storage (four bytes a pixel, then a copy into numpy). simplejpeg calls
TurboJPEG straight into a numpy array, releases the GIL while it decodes, and scales by the
same DCT factors Pillow's draft mode uses, so asked for Pillow's scale it produces
Pillow's pixels: identical on all 6,333 JPEGs of the shared benchmark data, and on the
synthetic set of tests/test_jpeg_fast_path.py (every draft scale, 4:2:0/4:4:4/grey,
progressive, all eight EXIF orientations). Pillow stays the decoder of everything else
and of every JPEG this path declines, and it alone produces the error of a file that fails:
the fast path only ever returns pixels or nothing.

Hand-written here: the choice of files it may take and the EXIF orientation as array
views (simplejpeg decodes pixels only); no library joins the two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import numpy as np
from PIL import Image

#: Leading bytes of every JPEG file (SOI marker, then the first marker's 0xFF).
JPEG_MAGIC = b"\xff\xd8\xff"
#: Files larger than this are left to Pillow, which streams them: reading a file whole is
#: what the fast path costs in memory, and a real JPEG under the pixel limit is far smaller.
MAX_FAST_BYTES = 64 * 1024 * 1024

#: EXIF orientation -> the same transposition :func:`PIL.ImageOps.exif_transpose` makes,
#: as numpy views of an H x W x C array (copied once, by the caller).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (counter-clockwise)
}


@functools.cache
def _simplejpeg() -> ModuleType | None:
    """simplejpeg, imported on the first decode; None where it is missing (a dependency of
    cbir, so only in a broken install: every JPEG then goes through Pillow, as before)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available() -> bool:
    """True when the fast path can run (simplejpeg is importable)."""
    return _simplejpeg() is not None


def is_jpeg(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) starts like a JPEG file."""
    return head[:3] == JPEG_MAGIC


def decode_like_pillow(data: bytes, img: Image.Image, orientation: int) -> np.ndarray | None:
    """Upright RGB uint8 H x W x 3 pixels of the JPEG ``data``, equal to what Pillow gives
    for ``img`` (the same file opened by Pillow, draft mode already set), or None where
    this path does not apply or fails: the caller then decodes with Pillow.

    It applies to 8-bit RGB/YCbCr and greyscale JPEGs (CMYK and others go to Pillow).
    Pillow's draft mode has chosen the DCT scale (``img.decoderconfig``) and the size
    (``img.size``); simplejpeg is asked for exactly that scale and the result is checked
    against that size.
    """
    simplejpeg = _simplejpeg()
    if simplejpeg is None or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    scale = img.decoderconfig[0] if img.decoderconfig else 1
    width, height = img.size
    if scale not in (1, 2, 4, 8):
        return None
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=scale, min_width=width,
                                     min_height=height, strict=True)  # fmt: skip
    except Exception:  # corrupt, truncated, unsupported: Pillow decides and reports
        return None
    if arr.shape != (height, width, 3):
        return None
    flip = _ORIENT.get(orientation)
    return np.ascontiguousarray(flip(arr)) if flip is not None else arr
