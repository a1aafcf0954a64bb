"""The server's defences, one test per fault found in the security pass (issue 15):

* a decompression bomb is refused from its header, and the server's memory shows it
  (peak RSS of a server process, measured around the request);
* a large 16-bit image is shrunk while decoding, or refused past the decode ceiling;
* slowloris connections (headers or body trickled in) are cut off, and connections past
  the cap are refused;
* ids past 2^63-1 are a 422, not an overflow;
* an upload is written only while the writer lock is held;
* paths in responses are relative to the indexed root, however ``--db`` was spelled.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_image
from fastapi.testclient import TestClient
from live_server import free_port, running_server
from PIL import Image, ImageFile

from cbir.data.decode import check_image, decode_memory, image_size, load_image, read_header
from cbir.index import Index
from cbir.serve import ServeSettings, create_app

TOKEN = "hardening-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOO_BIG_ID = 2**63
MB = 2**20


# -- generated images ---------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour: int = 0, exif: bytes | None = None) -> bytes:
    """A valid all-black PNG of any size, streamed through zlib row by row.

    Pillow would need the whole bitmap in memory to write it (900 MB for the bomb); the
    format (signature, IHDR, [eXIf], IDAT, IEND) is simple enough to write directly.
    """
    channels = {0: 1, 2: 3}[colour]
    row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)  # filter byte + pixels
    comp = zlib.compressobj(9)
    block = 256
    body = [comp.compress(row * block) for _ in range(height // block)]
    body += [comp.compress(row * (height % block)), comp.flush()]
    head = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))
    extra = _chunk(b"eXIf", exif) if exif is not None else b""
    return b"\x89PNG\r\n\x1a\n" + head + extra + _chunk(b"IDAT", b"".join(body)) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~110 KB 1-bit PNG declaring 30000 x 30000 pixels (900 MB once decoded)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_bytes(30_000, 30_000, 1))
    assert path.stat().st_size < 200_000
    return path


@pytest.fixture(scope="module")
def deep_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~100 KB 16-bit grey PNG of 7000 x 7000 (49 Mpx: under the pixel limit)."""
    path = tmp_path_factory.mktemp("deep") / "deep.png"
    path.write_bytes(png_bytes(7000, 7000, 16))
    return path


# -- decoding from the header only ----------------------------------------------------------------
def test_header_reads_never_decode_pixels(bomb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's PNG getexif() loads the image; the header functions must never call load()."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    data = bomb.read_bytes()
    assert image_size(data) == (30_000, 30_000)
    assert read_header(bomb).mode == "1"
    with pytest.raises(Exception, match="900,000,000 pixels exceeds the limit of 50,000,000") as err:
        check_image(data, max_pixels=50_000_000)
    assert err.value.code == "too_many_pixels" and err.value.http_status == 422


def test_orientation_from_an_early_png_exif_chunk(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 40 x 20, shown 20 x 40
    data = png_bytes(40, 20, 8, colour=2, exif=exif.tobytes())
    assert image_size(data) == (20, 40)
    assert load_image(data).size == (20, 40)


def test_decode_memory_estimate_and_ceiling(deep_png: Path) -> None:
    data = deep_png.read_bytes()
    assert decode_memory("I;16", (7000, 7000)) == 7000 * 7000 * (2 + 5)  # bitmap + 8-bit plane + RGB
    assert decode_memory("I;16", (7000, 7000), shrink=8) < 7000 * 7000 * 3
    assert decode_memory("RGB", (100, 100)) == 100 * 100 * 4
    with pytest.raises(Exception, match="would take about 327 MB, over the limit of 64 MB") as err:
        check_image(data, max_decode_bytes=64 * MB)
    assert err.value.code == "decode_memory_limit"
    # shrunk while decoding: the same file fits once the model's input size is known
    header = check_image(data, max_decode_bytes=128 * MB, target_size=lambda w, h: (224, 224))
    assert header.mode == "I;16"


def test_sixteen_bit_images_shrink_to_the_model_size(tmp_path: Path) -> None:
    """Shrunk with a box filter before the 8-bit conversion: same picture, smaller."""
    import numpy as np

    ramp = (np.arange(512 * 256, dtype=np.uint32).reshape(256, 512) % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    small = load_image(tmp_path / "ramp.png", target_size=lambda w, h: (128, 64))
    full = load_image(tmp_path / "ramp.png")
    assert small.size == (128, 64) and full.size == (512, 256)
    reduced = np.asarray(full.resize((128, 64), Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(small, np.float32) - reduced).mean() < 2.0


# -- a server process: its peak memory around one request ------------------------------------------
PROBE = r"""
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from cbir.index import Index
from cbir.serve import ServeSettings, create_app

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

db, warm, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
index = Index.open(db, create=False, readonly=True)
app = create_app(index, ServeSettings(search_threads=1, refresh_seconds=0, log_requests=False))
out = []
with TestClient(app) as client:
    files = {"image": ("warm.jpg", Path(warm).read_bytes(), "image/jpeg")}
    assert client.post("/search", files=files, data={"k": "3"}).status_code == 200
    for name, path in cases:
        files = {"image": ("q.png", Path(path).read_bytes(), "image/png")}
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak (VmHWM) restarts from the current RSS
        base = status("VmRSS")
        r = client.post("/search", files=files, data={"k": "3"})
        code = r.json()["error"]["code"] if r.status_code != 200 else None
        out.append({"name": name, "status": r.status_code, "code": code, "peak_mb": status("VmHWM") - base})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory, tiny_descriptor) -> Path:
    base = tmp_path_factory.mktemp("hardening")
    for i in range(8):
        make_image(base / "photos" / f"p{i}.jpg", seed=400 + i)
    with Index.create(base / "db", model=tiny_descriptor) as idx:
        idx.sync([base / "photos"], progress=False, workers=0)
    return base


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_bomb_and_16_bit_image_do_not_allocate_their_size(collection: Path, bomb: Path, deep_png: Path) -> None:
    """In a separate server process, after a warm-up search: the 30000 x 30000 bomb is
    refused from its header (+858 MB before the fix), the 7000 x 7000 16-bit PNG is
    searched with about 100 MB of decoding (+1.2 GB before)."""
    cases = [["bomb", str(bomb)], ["deep", str(deep_png)]]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(collection / "db"), str(collection / "photos" / "p0.jpg"), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = {r["name"]: r for r in json.loads(lines[0][len("RESULT ") :])}
    assert result["bomb"]["status"] == 422 and result["bomb"]["code"] == "too_many_pixels"
    assert result["bomb"]["peak_mb"] < 100, result
    assert result["deep"]["status"] == 200, result
    assert result["deep"]["peak_mb"] < 300, result


# -- the API ---------------------------------------------------------------------------------------
@pytest.fixture
def index(collection: Path) -> Iterator[Index]:
    idx = Index.open(collection / "db", create=False)
    yield idx
    idx.close()


def _settings(upload_dir: Path, **kwargs) -> ServeSettings:
    return ServeSettings(
        token=TOKEN, writes=True, upload_dir=upload_dir, search_threads=1, refresh_seconds=0, **kwargs
    )


@pytest.fixture
def client(index: Index, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(index, _settings(tmp_path / "uploads")), raise_server_exceptions=False) as c:
        yield c


def test_decode_ceiling_refuses_before_decoding(index: Index, tmp_path: Path, deep_png: Path) -> None:
    settings = _settings(tmp_path / "up", max_decode_bytes=16 * MB)
    with TestClient(create_app(index, settings), raise_server_exceptions=False) as c:
        files = {"image": ("deep.png", deep_png.read_bytes(), "image/png")}
        r = c.post("/search", files=files)
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["code"] == "decode_memory_limit" and "over the limit of 16 MB" in err["message"]
        assert c.post("/images", files=files, headers=AUTH).status_code == 422
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize(
    ("method", "url", "form"),
    [
        ("GET", "/images/{id}", None),
        ("GET", "/images/{id}/info", None),
        ("GET", "/thumbnails/{id}", None),
        ("DELETE", "/images/{id}", None),
        ("POST", "/search", {"id": "{id}"}),
    ],
)
def test_ids_are_bounded_to_64_bits(client: TestClient, method: str, url: str, form: dict | None) -> None:
    for image_id, status in ((TOO_BIG_ID, 422), (10**30, 422), (TOO_BIG_ID - 1, 404)):
        data = {k: v.format(id=image_id) for k, v in form.items()} if form else None
        r = client.request(method, url.format(id=image_id), data=data, headers=AUTH)
        assert r.status_code == status, (url, image_id, r.text)
        assert r.json()["error"]["code"] == ("invalid_request" if status == 422 else "image_not_found")


def test_paths_are_relative_with_a_relative_db(index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cbir serve --db db`` stores uploads in db/uploads; clients see uploads/<name>."""
    monkeypatch.chdir(tmp_path)
    settings = _settings(Path("db") / "uploads")
    data = make_image(tmp_path / "new.png", seed=909).read_bytes()
    with TestClient(create_app(index, settings), raise_server_exceptions=False) as c:
        added = c.post("/images", files={"image": ("new.png", data, "image/png")}, headers=AUTH)
        assert added.status_code == 201, added.text
        path = added.json()["path"]
        assert path.startswith("uploads/") and path.endswith(".png") and len(path) == len("uploads/") + 36
        hits = c.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "1"}).json()
        assert hits["results"][0]["path"] == path
        assert c.get(f"/images/{added.json()['id']}/info").json()["path"] == path
        assert c.delete(f"/images/{added.json()['id']}", headers=AUTH).status_code == 200
    assert list((tmp_path / "db" / "uploads").iterdir()) == []


def test_upload_is_written_only_under_the_writer_lock(index: Index, client: TestClient, tmp_path: Path) -> None:
    """While another writer (``cbir index`` in another process) holds the lock: 409, and
    nothing is left in the upload folder."""
    data = make_image(tmp_path / "late.png", seed=910).read_bytes()
    other = Index.open(index.folder, create=False)
    try:
        with other.writer(wait=0):
            r = client.post("/images", files={"image": ("late.png", data, "image/png")}, headers=AUTH)
            assert r.status_code == 409, r.text
            err = r.json()["error"]
            assert err["code"] == "index_busy" and str(index.folder) not in err["message"]
            assert client.delete("/images/1", headers=AUTH).status_code == 409
        uploads = tmp_path / "uploads"
        assert not uploads.exists() or list(uploads.iterdir()) == []
        r = client.post("/images", files={"image": ("late.png", data, "image/png")}, headers=AUTH)
        assert r.status_code == 201, r.text
        assert client.delete(f"/images/{r.json()['id']}", headers=AUTH).status_code == 200
    finally:
        other.close()


# -- connections: slowloris, slow bodies, the cap (a real uvicorn on loopback) ---------------------
@pytest.fixture
def live_server(index: Index) -> Iterator[tuple[int, ServeSettings]]:
    settings = ServeSettings(
        port=free_port(), search_threads=1, refresh_seconds=0, log_requests=False,
        header_timeout=2.0, body_timeout=1.0, body_min_rate=1000, max_connections=150,
    )
    with running_server(index, settings) as port:
        yield port, settings


def slow_clients(port: int, count: int, start: bytes, trickle: bytes, trickle_for: float) -> tuple[list[bytes], int]:
    """``count`` connections that send ``start``, then trickle ``trickle`` every 0.2 s for
    ``trickle_for`` seconds (slowloris: bytes keep coming, so a timer reset by each byte
    never fires), then read until the server has closed them all (20 s at most).

    Returns what each connection received and how many are still open. (The trickle stops
    before the deadline: bytes sent into a socket the server has closed would make the
    kernel reset it and drop the 408 not yet read.)
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            s.send(start)
            sockets.append(s)
        return _until_closed(sockets, trickle, trickle_for, within=20)
    finally:
        for s in sockets:
            s.close()


def _until_closed(
    sockets: list[socket.socket], trickle: bytes, trickle_for: float, within: float
) -> tuple[list[bytes], int]:
    received = [b""] * len(sockets)
    open_ = set(range(len(sockets)))
    start = time.monotonic()
    while open_ and time.monotonic() < start + within:
        for i in list(open_):
            try:
                chunk = sockets[i].recv(4096)
            except BlockingIOError:
                if time.monotonic() < start + trickle_for:
                    sockets[i].send(trickle)
                continue
            except OSError:
                open_.discard(i)
                continue
            received[i] += chunk
            if not chunk:
                open_.discard(i)
        time.sleep(0.2)
    return received, len(open_)


def test_slowloris_connections_are_cut_off_and_capped(live_server: tuple[int, ServeSettings]) -> None:
    """200 clients trickling header lines: past the cap of 150 they get 503 at once; the
    others get 408 at the 2 s header deadline. None is left open (uvicorn alone: all 200,
    for as long as they trickle)."""
    port, settings = live_server
    start = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    received, still_open = slow_clients(port, 200, start, trickle=b"X-a: b\r\n", trickle_for=1.2)
    assert still_open == 0
    statuses = [r.split(b"\r\n", 1)[0] for r in received]
    assert statuses.count(b"HTTP/1.1 503 Service Unavailable") == 200 - settings.max_connections
    assert statuses.count(b"HTTP/1.1 408 Request Timeout") == settings.max_connections
    # and the server still answers
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_slow_request_bodies_are_cut_off(live_server: tuple[int, ServeSettings]) -> None:
    """A body trickled at a byte a round is closed with 408 after the body deadline; one
    sent promptly is answered."""
    port, _ = live_server
    head = (
        b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n"
    )
    received, still_open = slow_clients(port, 5, head, trickle=b"x", trickle_for=0.6)
    assert still_open == 0
    assert all(r.startswith(b"HTTP/1.1 408") for r in received), received
    body = b'--b\r\nContent-Disposition: form-data; name="id"\r\n\r\n1\r\n--b--\r\n'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /search HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["count"] >= 1


def test_settings_refuse_nonpositive_limits() -> None:
    from cbir.serve import ServeConfigError

    for field in ("header_timeout", "body_timeout", "max_connections", "max_decode_bytes"):
        with pytest.raises(ServeConfigError, match="positive"):
            ServeSettings(**{field: 0}).validate()

