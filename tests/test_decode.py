"""Decoding every kind of file a crawl turns up, and extraction over a folder of bad inputs.

Each case is made here, in a few milliseconds, with Pillow (or, for the 20000 x 20000
PNG, a few lines of zlib so that the file costs 50 kB instead of 400 MB of pixels).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.data.decode import DEFAULT_MAX_PIXELS, DecodeError, image_size, load_image, to_rgb
from cbir.extract import extract

EXIF_ORIENTATION = 0x0112
HUGE = 20_000


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---------------------------------------------------------------------------------------
# makers
# ---------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_bytes(width: int = HUGE, height: int = HUGE) -> bytes:
    """A valid 1-bit grey PNG of width x height, all black, streamed through zlib.

    Pillow would need the whole 400-megapixel image in memory to write it; the PNG format
    (RFC 2083: signature, IHDR, IDAT, IEND) is simple enough to stream instead.
    """
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte 0 + packed 1-bit pixels
    comp = zlib.compressobj(9)
    rows_per_chunk = 500
    body = [comp.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
    body.append(comp.compress(row * (height % rows_per_chunk)))
    body.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(body))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20000 x 20000 PNG, made once per test session."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    path.write_bytes(huge_png_bytes())
    return path


def textured(size: tuple[int, int], seed: int) -> Image.Image:
    """In-memory twin of conftest.make_image: smooth colour blobs plus noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, max(w, h) / 2)
        mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += mask[..., None] * rng.uniform(0, 255, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def save_rotated_jpeg(upright: Image.Image, path: Path, orientation: int) -> Path:
    """Store ``upright`` rotated, with the EXIF orientation that turns it back upright."""
    # exif_transpose applies ROTATE_270 for orientation 6 and ROTATE_90 for 8; undo that
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def valid_jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    buf = io.BytesIO()
    textured(size, seed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def corrupt_jpeg_bytes() -> bytes:
    """A JPEG start-of-image and JFIF header followed by random bytes."""
    header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return header + np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes()


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in img.getpixel(xy))


# ---------------------------------------------------------------------------------------
# modes -> RGB
# ---------------------------------------------------------------------------------------
def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black
    arr[0, 1] = (255, 0, 0, 255)  # opaque red
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 4)
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in pixel(img, (2, 0)))


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putdata([0, 1, 1])
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == (255, 255, 255)  # the transparent index
    assert pixel(out, (1, 0)) == (10, 200, 30)


def test_palette_without_transparency() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([5, 6, 7, 200, 100, 50] + [0] * 762)
    img.putdata([0, 1])
    out = to_rgb(img)
    assert [pixel(out, (x, 0)) for x in range(2)] == [(5, 6, 7), (200, 100, 50)]


def test_la_and_l(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [200, 255]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert [pixel(out, (x, 0)) for x in range(3)] == [(255,) * 3, (0,) * 3, (200,) * 3]
    Image.fromarray(np.array([[7, 250]], np.uint8), mode="L").save(tmp_path / "l.png")
    out = load_image(tmp_path / "l.png")
    assert [pixel(out, (x, 0)) for x in range(2)] == [(7,) * 3, (250,) * 3]


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535, 1000]], np.uint16)
    path = tmp_path / "i16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # I;16 (or I on some Pillow versions)
    out = load_image(path)
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 128, 255, 3]


def test_32_bit_integer_and_float_modes() -> None:
    i_img = Image.fromarray(np.array([[0, 100, 255]], np.int32), mode="I")
    assert [pixel(to_rgb(i_img), (x, 0)) for x in range(3)] == [(0,) * 3, (100,) * 3, (255,) * 3]
    # above 255 an integer image is read as 16-bit data (a dark one stays dark) ...
    i_16 = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), mode="I")
    assert [pixel(to_rgb(i_16), (x, 0))[0] for x in range(3)] == [0, 3, 255]
    # ... and beyond 16 bits it is scaled by its maximum
    i_wide = Image.fromarray(np.array([[0, 1 << 19, 1 << 20]], np.int32), mode="I")
    assert [pixel(to_rgb(i_wide), (x, 0))[0] for x in range(3)] == [0, 127, 255]
    f_unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert [pixel(to_rgb(f_unit), (x, 0))[0] for x in range(3)] == [0, 127, 255]
    f_nan = Image.fromarray(np.array([[np.nan, 0.25]], np.float32), mode="F")
    assert [pixel(to_rgb(f_nan), (x, 0))[0] for x in range(2)] == [0, 63]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # red in CMYK
    out = load_image(path)
    r, g, b = pixel(out, (8, 8))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_bilevel_and_one_pixel(tmp_path: Path) -> None:
    Image.new("1", (5, 3), 1).save(tmp_path / "bw.png")
    out = load_image(tmp_path / "bw.png")
    assert out.size == (5, 3) and pixel(out, (4, 2)) == (255, 255, 255)
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    out = load_image(tmp_path / "one.png")
    assert out.size == (1, 1) and pixel(out) == (1, 2, 3)


# ---------------------------------------------------------------------------------------
# orientation and draft decoding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotation_gives_the_upright_image(tmp_path: Path, orientation: int) -> None:
    upright = textured((160, 96), seed=1)
    upright.save(tmp_path / "upright.jpg", quality=95)
    path = save_rotated_jpeg(upright, tmp_path / "rotated.jpg", orientation)
    assert Image.open(path).size == (96, 160)  # stored as portrait
    out = load_image(path)
    assert out.size == (160, 96)
    ref = np.asarray(load_image(tmp_path / "upright.jpg"), np.float32)
    assert np.abs(np.asarray(out, np.float32) - ref).mean() < 3.0
    assert image_size(path) == (160, 96)


@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_decodes_reduced_but_never_below_target(tmp_path: Path, orientation: int) -> None:
    upright = textured((800, 600), seed=2)
    path = tmp_path / "big.jpg"
    if orientation == 1:
        upright.save(path, quality=90)
    else:
        save_rotated_jpeg(upright, path, orientation)
    # JPEG's DCT scales are 1/1, 1/2, 1/4, 1/8: the smallest that still covers the target
    expected = {(100, 75): (100, 75), (150, 113): (200, 150), (500, 375): (800, 600)}
    for target, size in expected.items():
        seen: list[tuple[int, int]] = []

        def target_size(
            w: int, h: int, t: tuple[int, int] = target, log: list = seen
        ) -> tuple[int, int]:
            log.append((w, h))
            return t

        assert load_image(path, target_size=target_size).size == size
        assert seen == [(800, 600)]  # asked with the upright size, whatever the EXIF
    assert load_image(path).size == (800, 600)


# ---------------------------------------------------------------------------------------
# failures: always a DecodeError with a reason
# ---------------------------------------------------------------------------------------
def test_bad_files_raise_decode_errors(tmp_path: Path) -> None:
    cases = {
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not an image\n" * 20, "not an image"),
        "corrupt.jpg": (corrupt_jpeg_bytes(), ""),
        "truncated.jpg": (valid_jpeg_bytes((256, 192))[:1500], "truncated"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DecodeError) as info:
            load_image(path)
        assert info.value.path == str(path)
        assert reason in info.value.reason and info.value.reason
        assert str(path) in str(info.value)
    with pytest.raises(DecodeError, match="cannot read file"):
        load_image(tmp_path / "missing.jpg")


def test_pixel_limit(tmp_path: Path, huge_png: Path) -> None:
    assert Image.open(huge_png).size == (HUGE, HUGE)
    with pytest.raises(DecodeError, match="too large") as info:
        load_image(huge_png)
    assert f"{DEFAULT_MAX_PIXELS:,}" in info.value.reason
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(DecodeError, match="too large"):
        load_image(path, max_pixels=9_999)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    assert load_image(path, max_pixels=None).size == (100, 100)


def test_bytes_and_stream_sources() -> None:
    data = valid_jpeg_bytes()
    assert load_image(data).size == (64, 48)
    assert load_image(io.BytesIO(data)).size == (64, 48)
    with pytest.raises(DecodeError, match="empty") as info:
        load_image(b"")
    assert info.value.path == "<bytes>"
    with pytest.raises(DecodeError):
        load_image(io.BytesIO(b"junk"))


# ---------------------------------------------------------------------------------------
# extraction over the bad-input folder
# ---------------------------------------------------------------------------------------
#: file -> a word its skip reason must contain
EXPECTED_SKIPS = {
    "corrupt.jpg": "",
    "empty.jpg": "empty file",
    "huge.png": "too large",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
}


def upright_copy(stored_jpeg: Path, orientation: int, out: Path) -> Path:
    """The stored pixels turned upright by hand and saved losslessly, without EXIF."""
    pixels = Image.open(stored_jpeg).convert("RGB")
    turn = Image.Transpose.ROTATE_270 if orientation == 6 else Image.Transpose.ROTATE_90
    pixels.transpose(turn).save(out)
    return out


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory, huge_png: Path) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.jpg").write_bytes(corrupt_jpeg_bytes())
    (root / "truncated.jpg").write_bytes(valid_jpeg_bytes((256, 192))[:1500])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("hello, I am a text file\n")
    (root / "huge.png").write_bytes(huge_png.read_bytes())
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(
        root / "sixteen_bit.png"
    )
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :32] = (30, 90, 200, 255)
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    upright = textured((224, 160), seed=3)
    for o in (6, 8):
        stored = save_rotated_jpeg(upright, root / f"rotated{o}.jpg", o)
        upright_copy(stored, o, root / f"upright{o}.png")
    # the stored pixels without their EXIF tag: what a decoder ignoring EXIF would see
    Image.open(root / "rotated6.jpg").convert("RGB").save(root / "sideways.png")
    return root


def check_bad_folder_result(res, paths: list[Path], dim: int) -> dict[str, np.ndarray]:
    """Every bad file skipped with its reason, every other file described in input order."""
    skipped = {Path(f.path).name: f.reason for f in res.failures}
    assert set(skipped) == set(EXPECTED_SKIPS)
    for name, word in EXPECTED_SKIPS.items():
        assert word in skipped[name] and skipped[name]
    described = [Path(p).name for p in res.paths]
    assert described == [p.name for p in paths if p.name not in EXPECTED_SKIPS]
    assert res.features.shape == (len(described), dim)
    assert np.isfinite(res.features).all()
    np.testing.assert_allclose(np.linalg.norm(res.features, axis=1), 1.0, atol=1e-4)
    manifest = res.manifest()
    assert [f["path"] for f in manifest["failures"]] == [
        str(p) for p in paths if p.name in EXPECTED_SKIPS
    ]
    assert manifest["files"] == res.paths
    return {name: res.features[i] for i, name in enumerate(described)}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_extraction_over_bad_folder_lite0(bad_folder: Path, lite0_descriptor, workers: int) -> None:
    paths = sorted(bad_folder.iterdir())
    res = extract(lite0_descriptor, paths, workers=workers, batch_size=8, progress=False)
    row = check_bad_folder_result(res, paths, lite0_descriptor.dim)
    for o in (6, 8):
        assert float(row[f"rotated{o}.jpg"] @ row[f"upright{o}.png"]) > 0.999
    # the check can fail: the same pixels without their EXIF tag are far from upright
    assert float(row["sideways.png"] @ row["upright6.png"]) < 0.99


def test_extraction_over_bad_folder_in_workers(bad_folder: Path, tiny_descriptor) -> None:
    paths = sorted(bad_folder.iterdir())
    res = extract(tiny_descriptor, paths, workers=2, batch_size=4, progress=False)
    row = check_bad_folder_result(res, paths, tiny_descriptor.dim)
    # decoding in worker processes gives the vectors of decoding in this one
    res0 = extract(tiny_descriptor, paths, workers=0, batch_size=4, progress=False)
    np.testing.assert_allclose(res.features, res0.features, atol=1e-5)
    assert float(row["rotated6.jpg"] @ row["upright6.png"]) > 0.999


# ---------------------------------------------------------------------------------------
# listing folders: symbolic links
# ---------------------------------------------------------------------------------------
def test_list_images_follows_links_inside_only_and_survives_loops(tmp_path: Path) -> None:
    from cbir.data.datasets import list_images

    root = tmp_path / "root"
    for rel in ("a.jpg", "real/b.png", "real/deep/c.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (2, 2)).save(outside / "secret.jpg")
    (root / "alias").symlink_to(root / "real")  # a second name for a folder inside
    (root / "real" / "deep" / "loop").symlink_to(root)  # a cycle
    (root / "escape").symlink_to(outside)  # a folder outside
    (root / "secret.jpg").symlink_to(outside / "secret.jpg")  # a file outside
    (root / "inside.jpg").symlink_to(root / "a.jpg")  # a file inside: kept
    listed = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert listed == ["a.jpg", "inside.jpg", "real/b.png", "real/deep/c.jpg"]
    assert [p.name for p in list_images(root, recursive=False)] == ["a.jpg", "inside.jpg"]
    assert list_images(root / "a.jpg") == [root / "a.jpg"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(tmp_path / "missing")
