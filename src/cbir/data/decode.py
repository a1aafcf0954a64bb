"""Robust image decoding: every file becomes an RGB ``PIL.Image`` or a :class:`DecodeError`.

Retrieval jobs run over collections nobody curated, so decoding must never be the
thing that ends a 100,000-image run. This module owns every decision about turning
bytes into pixels: JPEG draft-mode (decode at 1/2, 1/4 or 1/8 scale when the model
input is much smaller), EXIF orientation, conversion of every Pillow mode to RGB,
and a pixel limit that replaces Pillow's process-wide decompression-bomb check with
a per-call, configurable one that raises a normal, reportable error.

Both limits (pixels and decode memory) are checked from the file's header, before a
single pixel is decoded: a 100 KB PNG can declare 30000 x 30000 pixels, and anything that
touches its pixels first (including Pillow's PNG ``getexif()``, which loads the image to
look for an EXIF chunk after the pixel data) has already paid for them.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from cbir.data import jpeg
from cbir.defaults import DEFAULT_MAX_PIXELS as DEFAULT_MAX_PIXELS  # written once, in cbir.defaults
from cbir.errors import CbirError

# Pillow's own bomb check is global state and raises from deep inside ``open``; we
# enforce our own limit on the header's size before any pixel is decoded instead.
Image.MAX_IMAGE_PIXELS = None

#: Default ceiling on the memory one decode may take (the decoded bitmap plus the copies
#: made while turning it into upright 8-bit RGB), estimated from the header. It admits
#: every image under the default pixel limit except the few modes whose conversion costs
#: more than 20 bytes a pixel; servers set a lower one (``cbir serve --max-decode-mb``).
DEFAULT_MAX_DECODE_BYTES = 2 * 1024**3

#: Extensions treated as images when walking folders. HEIC/HEIF (phones' default) are read
#: through pillow-heif, AVIF by Pillow itself (11.3 and later) or pillow-heif.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
     ".heic", ".heif", ".avif"}
)  # fmt: skip

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}

ImageSource = str | os.PathLike | bytes | io.IOBase
#: Maps the upright (width, height) of an image to the size the model will resize it to.
TargetSize = Callable[[int, int], tuple[int, int]]


class DecodeError(CbirError):
    """An image that cannot be turned into pixels; carries the path and a human reason."""

    exit_code = 4  # docs/cli.md, "Exit codes"

    http_status = 422
    code = "undecodable_image"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class PixelLimitError(DecodeError):
    """The header declares more pixels than allowed (a decompression bomb, or just huge)."""

    code = "too_many_pixels"


class DecodeMemoryError(DecodeError):
    """Decoding would take more memory than allowed (e.g. a large 16-bit image)."""

    code = "decode_memory_limit"


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding a pixel."""

    format: str | None
    mode: str
    width: int  # as stored (before EXIF orientation)
    height: int
    orientation: int  # EXIF orientation when the header holds it, else 1

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) as the image is displayed, after its EXIF orientation."""
        if self.orientation in _SWAPPING_ORIENTATIONS:
            return self.height, self.width
        return self.width, self.height


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has one of the image extensions we index."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<bytes>" if isinstance(source, bytes) else "<stream>"


@functools.cache
def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF (and AVIF where Pillow lacks it) through pillow-heif, once, on the
    first decode: importing it at start-up would cost every command, ``cbir --help`` included.
    False when pillow-heif is not installed (such files are then reported as unrecognised)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    if not features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
    return True


def _open(source: ImageSource) -> Image.Image:
    register_heif()
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not cost us the image
        return 1


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation from what :func:`Image.open` has read, never loading pixels.

    Pillow's PNG ``getexif()`` decodes the whole image when no eXIf chunk came before the
    pixel data (one may follow it); that is a full decode, so a PNG without an early eXIf
    counts as upright here. :func:`load_image` looks again after decoding.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return _exif_orientation(img)


#: Bytes a pixel takes in Pillow's memory, by mode (RGB is stored in 4 bytes); others: 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _is_high_bit_depth(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _shrink_factor(size: tuple[int, int], orientation: int, target_size: TargetSize | None) -> int:
    """Integer factor a high-bit-depth image is box-filtered down by before its conversion.

    Like JPEG draft mode: the largest factor that keeps the image at least as large as
    the model's input, so only pixels the model would never see are averaged away.
    """
    if target_size is None:
        return 1
    width, height = size
    swap = orientation in _SWAPPING_ORIENTATIONS
    tw, th = target_size(*((height, width) if swap else (width, height)))
    if swap:
        tw, th = th, tw
    return max(1, min(width // max(1, tw), height // max(1, th)))


def decode_memory(
    mode: str,
    size: tuple[int, int],
    *,
    orientation: int = 1,
    shrink: int = 1,
    transparent: bool = False,
) -> int:
    """Estimated peak bytes of decoding an image of ``mode``/``size`` to upright RGB.

    The decoded bitmap, plus the largest of the copies made after it: the orientation
    transpose, and the RGB conversion (RGB: none; alpha composited on white: about four
    RGBA-sized images; 16/32-bit: an 8-bit plane and RGB, or only the reduced image when
    ``shrink`` > 1; any other mode: one RGB image).
    """
    pixels = size[0] * size[1]
    decoded = pixels * _PIXEL_BYTES.get(mode, 4)
    if mode == "RGB":
        convert = 0
    elif mode in _ALPHA_MODES or (mode == "P" and transparent):
        convert = 16 * pixels
    elif _is_high_bit_depth(mode) and shrink > 1:
        convert = (decoded + 5 * pixels) // (shrink * shrink)
    elif _is_high_bit_depth(mode):
        convert = 5 * pixels
    else:
        convert = 4 * pixels
    transpose = decoded if orientation != 1 else 0
    return decoded + max(convert, transpose)


#: Pixels converted per strip by :func:`_high_bit_depth_to_rgb` (a few MB of int64 each).
_STRIP_PIXELS = 1 << 19


def _strips(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels) of horizontal strips: numpy copies of a strip, never the image."""
    width, height = img.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, np.asarray(img.crop((0, top, width, min(height, top + rows))))


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images into 8 bits instead of clipping them.

    Works strip by strip (two passes: the maximum, then the scaling), so the extra memory
    is one 8-bit plane, not the four 8-byte-per-pixel copies of whole-array numpy code
    (+1.2 GB for a 7000 x 7000 16-bit PNG).
    """
    width, height = img.size
    floating = img.mode == "F"
    hi: float | int = 1.0 if floating else 0
    for _, strip in _strips(img):
        if strip.size:
            part = np.nan_to_num(strip.astype(np.float64)) if floating else strip.astype(np.int64)
            hi = max(hi, float(part.max()) if floating else int(part.max()))
    out = np.empty((height, width), np.uint8)
    for top, strip in _strips(img):
        out[top : top + strip.shape[0]] = _to_8_bits(strip, img.mode, hi)
    return Image.fromarray(out, mode="L").convert("RGB")


def _to_8_bits(strip: np.ndarray, mode: str, hi: float | int) -> np.ndarray:
    """One strip of :func:`_high_bit_depth_to_rgb`, scaled by the image's maximum ``hi``."""
    if mode == "F":
        arr = np.nan_to_num(strip.astype(np.float64))
        scale = 255.0 if hi <= 1.0 else (255.0 / hi if hi > 255.0 else 1.0)
        return np.clip(arr * scale, 0, 255).astype(np.uint8)
    arr = strip.astype(np.int64)
    if mode.startswith("I;16") or hi > 255:
        arr = arr // 257 if hi <= 65535 else arr * 255 // max(int(hi), 1)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _shrink(img: Image.Image, factor: int) -> Image.Image:
    """Box-filter a decoded high-bit-depth image by ``factor`` (its conversion then runs
    on the small image); unchanged where Pillow cannot resize the mode."""
    if factor <= 1 or not _is_high_bit_depth(img.mode):
        return img
    width, height = img.size
    try:
        return img.resize((-(-width // factor), -(-height // factor)), Image.Resampling.BOX)
    except ValueError:  # a 16-bit byte order Pillow does not resample
        return img


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


def _open_checked(source: ImageSource, name: str) -> Image.Image:
    """``Image.open`` (header only), with empty and unrecognised files as DecodeErrors."""
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.getsize(source) == 0:
                raise DecodeError(name, "empty file (0 bytes)")
        except OSError as exc:
            raise DecodeError(name, f"cannot read file: {exc.strerror or exc}") from exc
    elif isinstance(source, bytes) and not source:
        raise DecodeError(name, "empty file (0 bytes)")
    try:
        return _open(source)
    except UnidentifiedImageError as exc:
        raise DecodeError(name, "not an image (unrecognised format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError(name, f"cannot open: {exc}") from exc


def _plan(
    img: Image.Image,
    name: str,
    max_pixels: int | None,
    max_decode_bytes: int | None,
    target_size: TargetSize | None,
) -> int:
    """Check an opened image against both limits, from its header, and set up draft mode.

    Returns the factor a high-bit-depth image will be shrunk by after decoding. Raises
    :class:`PixelLimitError` or :class:`DecodeMemoryError` before any pixel is decoded.
    """
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(name, f"invalid dimensions {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise PixelLimitError(
            name,
            f"too large: {width}x{height} = {width * height:,} pixels "
            f"exceeds the limit of {max_pixels:,}",
        )
    orientation = _header_orientation(img)
    if target_size is not None and img.format == "JPEG":
        up_w, up_h = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
        tw, th = target_size(up_w, up_h)
        if orientation in _SWAPPING_ORIENTATIONS:
            tw, th = th, tw
        draft_mode = "RGB" if img.mode in ("RGB", "YCbCr") else None
        img.draft(draft_mode, (max(1, tw), max(1, th)))
    shrink = _shrink_factor(img.size, orientation, target_size) if _is_high_bit_depth(img.mode) else 1
    if max_decode_bytes is not None:
        need = decode_memory(
            img.mode,
            img.size,
            orientation=orientation,
            shrink=shrink,
            transparent="transparency" in img.info,
        )
        if need > max_decode_bytes:
            raise DecodeMemoryError(
                name,
                f"decoding this {width}x{height} {img.mode} image would take about "
                f"{_mb(need)}, over the limit of {_mb(max_decode_bytes)}",
            )
    return shrink


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: TargetSize | None = None,
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
) -> Image.Image:
    """Decode ``source`` to an upright RGB image.

    ``target_size`` tells the decoder how large the image will be after resizing, so a
    JPEG can be decoded directly at the smallest DCT scale that is still at least that
    large (``Image.draft``), which is several times faster for camera photos, and a
    16/32-bit image is box-filtered down to about that size before its 8-bit conversion.
    Any failure, including a truncated file, one over ``max_pixels`` or one whose decode
    would take more than ``max_decode_bytes`` (both judged from the header, before any
    pixel is decoded), raises :class:`DecodeError` with a reason a person can act on.
    """
    name = _describe(source)
    img = _open_checked(source, name)
    try:
        shrink = _plan(img, name, max_pixels, max_decode_bytes, target_size)
        return _decode_planned(img, shrink)
    except Exception as exc:
        raise _decode_error(name, exc) from exc


def load_pixels(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: TargetSize | None = None,
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
) -> np.ndarray:
    """:func:`load_image` as a uint8 H x W x 3 array: the same pixels, the same limits and
    errors, about twice as fast for JPEG files.

    A plain JPEG (8-bit RGB or greyscale, read whole: at most
    :data:`cbir.data.jpeg.MAX_FAST_BYTES`) is decoded by libjpeg-turbo through simplejpeg
    at the scale Pillow's draft mode chose, straight into the array (see
    :mod:`cbir.data.jpeg`); everything else, and any JPEG that path declines, by Pillow.
    Extraction uses this; code that wants a PIL image keeps :func:`load_image`.
    """
    name = _describe(source)
    data = _jpeg_bytes(source, name)
    img = _open_checked(source if data is None else data, name)
    try:
        shrink = _plan(img, name, max_pixels, max_decode_bytes, target_size)
        if data is not None:
            arr = jpeg.decode_like_pillow(data, img, _exif_orientation(img))  # JPEG: EXIF precedes pixels
            if arr is not None:
                return arr
        return np.asarray(_decode_planned(img, shrink), dtype=np.uint8)
    except Exception as exc:
        raise _decode_error(name, exc) from exc
    finally:
        img.close()


def _jpeg_bytes(source: ImageSource, name: str) -> bytes | None:
    """The whole file when ``source`` is a JPEG the fast path may take, else None (Pillow
    then opens ``source`` itself, and reports what is wrong with it)."""
    if not jpeg.available():
        return None
    if isinstance(source, bytes):
        return source if jpeg.is_jpeg(source) else None
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        with open(source, "rb") as f:
            if not jpeg.is_jpeg(f.read(3)) or os.fstat(f.fileno()).st_size > jpeg.MAX_FAST_BYTES:
                return None
            f.seek(0)
            return f.read(jpeg.MAX_FAST_BYTES + 1)
    except OSError:
        return None  # unreadable: _open_checked says why


def _decode_planned(img: Image.Image, shrink: int) -> Image.Image:
    """Decode an image whose limits :func:`_plan` has checked, to upright RGB."""
    img.load()
    orientation = _exif_orientation(img)  # now complete: a PNG's eXIf may follow its pixels
    img = _shrink(img, shrink)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def _decode_error(name: str, exc: Exception) -> DecodeError:
    """Any failure while decoding, as a :class:`DecodeError` a person can act on."""
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError)):
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason:
            reason = f"truncated or corrupt image data ({reason})"
        return DecodeError(name, reason)
    return DecodeError(name, f"{type(exc).__name__}: {exc}")  # decoder plug-ins raise anything


def read_header(source: ImageSource) -> ImageHeader:
    """Format, mode, stored size and EXIF orientation, from the header only.

    Never decodes a pixel, whatever the file declares (see :func:`_header_orientation`).
    """
    name = _describe(source)
    try:
        with _open(source) as img:
            width, height = img.size
            return ImageHeader(img.format, img.mode, width, height, _header_orientation(img))
    except Exception as exc:
        raise DecodeError(name, f"cannot read header: {exc}") from exc


def check_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: TargetSize | None = None,
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
) -> ImageHeader:
    """The header of ``source`` if :func:`load_image` with these limits would try to decode
    it; raises the same :class:`PixelLimitError`/:class:`DecodeMemoryError` otherwise.

    For a server: refuse a bomb before queueing it for a model thread. Reads the header
    only, so a file that passes may still fail to decode.
    """
    name = _describe(source)
    img = _open_checked(source, name)
    try:
        header = ImageHeader(img.format, img.mode, *img.size, _header_orientation(img))
        _plan(img, name, max_pixels, max_decode_bytes, target_size)
        return header
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(name, f"cannot read header: {exc}") from exc
    finally:
        img.close()


def image_size(source: ImageSource) -> tuple[int, int]:
    """Upright (width, height) from the header only, without decoding pixels."""
    return read_header(source).upright_size
