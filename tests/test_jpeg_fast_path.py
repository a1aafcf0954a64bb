"""The libjpeg-turbo fast path (:mod:`cbir.data.jpeg`): Pillow's pixels, limits and errors.

Every test that claims equality also asserts which decoder produced the pixels, so a fast
path that silently declined (and left Pillow to do the work) fails them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.data import jpeg
from cbir.data.decode import DecodeError, PixelLimitError, load_image, load_pixels
from cbir.data.transforms import Preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each decode, whether the fast path returned pixels (True) or declined."""
    calls: list[bool] = []
    real = jpeg.decode_like_pillow

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(jpeg, "decode_like_pillow", wrapper)
    return calls


def _photo(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth gradients, sharp edges and noise: decoders that differ anywhere differ here."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), ((xx // 37 + yy // 23) % 2) * 200], -1)
    arr = arr + rng.normal(0, 20, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, mode: str = "RGB", **kwargs) -> Path:
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="JPEG", **kwargs)
    return path


def _both(path: Path | bytes, target: int | None) -> tuple[np.ndarray, np.ndarray]:
    size = Preprocess(size=target, resize="squash").resized_size if target else None
    return load_pixels(path, target_size=size), np.asarray(load_image(path, target_size=size))


@pytest.mark.parametrize("target", [None, 1200, 600, 300, 150])  # draft scales 1, 1, 2, 4, 8
@pytest.mark.parametrize(
    "variant",
    [{"quality": 90}, {"quality": 95, "subsampling": 0}, {"quality": 80, "progressive": True}, {"mode": "L"}],
    ids=["420", "444", "progressive", "grey"],
)
def test_fast_path_gives_pillows_pixels_at_every_draft_scale(tmp_path: Path, spy: list[bool], target, variant) -> None:
    variant = dict(variant)
    path = _save(tmp_path / "p.jpg", _photo((1603, 1201)), variant.pop("mode", "RGB"), **variant)
    fast, pillow = _both(path, target)
    assert spy == [True]  # the fast path decoded it
    assert fast.dtype == np.uint8 and fast.shape == pillow.shape and fast.shape[2] == 3
    np.testing.assert_array_equal(fast, pillow)
    if target == 150:
        assert fast.shape[:2] == (151, 201)  # 1/8 scale, rounded up as Pillow's draft rounds


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_applies_every_exif_orientation_as_pillow_does(tmp_path: Path, spy: list[bool], orientation) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path / "o.jpg", _photo((320, 200), seed=orientation), exif=exif.tobytes())
    fast, pillow = _both(path, 100)
    assert spy == [True]
    np.testing.assert_array_equal(fast, pillow)
    assert fast.flags.c_contiguous
    assert (fast.shape[0] > fast.shape[1]) == (orientation >= 5)  # 5-8 turn the landscape upright


def test_bytes_sources_take_the_fast_path_and_streams_go_to_pillow(tmp_path: Path, spy: list[bool]) -> None:
    path = _save(tmp_path / "b.jpg", _photo((300, 200)))
    data = path.read_bytes()
    size = Preprocess(size=100).resized_size
    np.testing.assert_array_equal(load_pixels(data, target_size=size), np.asarray(load_image(path, target_size=size)))
    assert spy == [True]
    np.testing.assert_array_equal(load_pixels(io.BytesIO(data), target_size=size), load_pixels(data, target_size=size))
    assert spy == [True, True]  # the stream never reached the fast path


def test_cmyk_and_non_jpeg_files_are_decoded_by_pillow(tmp_path: Path, spy: list[bool]) -> None:
    cmyk = _save(tmp_path / "c.jpg", _photo((200, 150)), "CMYK")
    fast, pillow = _both(cmyk, 100)
    assert spy == [False]  # looked, declined
    np.testing.assert_array_equal(fast, pillow)
    png = tmp_path / "p.png"
    Image.fromarray(_photo((120, 90))).save(png)
    jpeg_named_png = tmp_path / "looks.jpg"
    jpeg_named_png.write_bytes(png.read_bytes())
    for p in (png, jpeg_named_png):  # the content decides, not the name
        np.testing.assert_array_equal(load_pixels(p), np.asarray(load_image(p)))
    assert spy == [False]


def test_damaged_jpegs_fail_with_pillows_error(tmp_path: Path, spy: list[bool]) -> None:
    good = _save(tmp_path / "g.jpg", _photo((400, 300))).read_bytes()
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "x.jpg"
    garbage.write_bytes(good[:200] + bytes(range(256)) * 4)
    for path in (truncated, garbage):
        with pytest.raises(DecodeError) as fast:
            load_pixels(path)
        with pytest.raises(DecodeError) as pillow:
            load_image(path)
        assert fast.value.reason == pillow.value.reason and fast.value.path == str(path)
    assert spy and not any(spy)  # the fast path gave no pixels for either


def test_limits_are_checked_before_the_fast_path_decodes(tmp_path: Path, spy: list[bool]) -> None:
    path = _save(tmp_path / "big.jpg", _photo((640, 480)))
    with pytest.raises(PixelLimitError):
        load_pixels(path, max_pixels=640 * 480 - 1)
    with pytest.raises(DecodeError, match="over the limit"):
        load_pixels(path, max_decode_bytes=1000)
    assert spy == []  # refused from the header: nothing was decoded


def test_a_jpeg_too_large_to_read_whole_is_streamed_by_pillow(
    tmp_path: Path, spy: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path / "l.jpg", _photo((300, 200)))
    monkeypatch.setattr(jpeg, "MAX_FAST_BYTES", path.stat().st_size - 1)
    np.testing.assert_array_equal(load_pixels(path), np.asarray(load_image(path)))
    assert spy == []


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is not present")
def test_fast_path_equals_pillow_on_the_shared_photographs(spy: list[bool]) -> None:
    """Real JPEGs from cameras and scanners (rparis-mini's photos, gpr-mini's first 600)."""
    files = sorted((SHARED / "rparis-mini" / "jpg").glob("*.jpg"))
    files += sorted((SHARED / "gpr-mini" / "images").glob("*.jpg"))[:600]
    assert len(files) > 600
    for target in (224, 512):
        size = Preprocess(size=target, resize="keep").resized_size
        for f in files:
            np.testing.assert_array_equal(load_pixels(f, target_size=size),
                                          np.asarray(load_image(f, target_size=size)), err_msg=str(f))  # fmt: skip
    assert len(spy) == 2 * len(files) and all(spy)
