"""The HTTP API through FastAPI's test client, over a real Index of small generated images.

Every endpoint, every error the API promises (413, 415, 422, 401, 403, 404), path
traversal attempts, and the token rules.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from conftest import make_image
from fastapi.testclient import TestClient
from PIL import Image

from cbir.errors import CbirError
from cbir.index import Index
from cbir.serve import ServeConfigError, ServeSettings, create_app
from cbir.serve.security import (
    is_loopback,
    read_token_file,
    sniff_image_format,
    token_matches,
    write_new_token,
)

TOKEN = "t0k3n-for-tests-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("collection") / "images"
    for i in range(10):
        make_image(root / f"img_{i:02d}.jpg", seed=i)
    make_image(root / "sub" / "a.png", seed=100)
    make_image(root / "sub" / "b.png", seed=101)
    return root


@pytest.fixture(scope="module")
def index(collection: Path, tiny_descriptor, tmp_path_factory: pytest.TempPathFactory):
    db = tmp_path_factory.mktemp("db") / "index"
    idx = Index.create(db, model=tiny_descriptor)
    idx.sync([collection], progress=False, workers=0)
    yield idx
    idx.close()


@pytest.fixture
def settings(tmp_path: Path) -> ServeSettings:
    return ServeSettings(
        token=TOKEN,
        writes=True,
        upload_dir=tmp_path / "uploads",
        max_upload_bytes=200_000,
        max_pixels=1_000_000,
        search_threads=2,
        refresh_seconds=0,
    )


@pytest.fixture
def client(index: Index, settings: ServeSettings):
    with TestClient(create_app(index, settings), raise_server_exceptions=False) as c:
        yield c


def _png(size: tuple[int, int] = (64, 48), seed: int = 7) -> bytes:
    rng = __import__("numpy").random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype="uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == response.status_code
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def _some_id(index: Index) -> int:
    """Catalogue id of img_00.jpg (searching by an indexed path returns the file first)."""
    return index.search(os.path.join(index.roots[0], "img_00.jpg"), k=1)[0].id


# -- read endpoints ----------------------------------------------------------------------------
def test_health_and_stats(client: TestClient, index: Index) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "images": len(index)}
    s = client.get("/stats").json()
    assert s["images"] == len(index) == 12
    assert s["descriptor"] == index.descriptor.describe_name()
    assert s["dim"] == index.descriptor.dim
    assert s["roots"] == 1  # a count: the server's folders are not disclosed
    assert s["server"]["writes"] is True and s["server"]["max_k"] == 100
    assert "path" not in s


def test_page_and_static_assets(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in r.text and "http" not in r.text.split("<footer")[0]
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        a = client.get(f"/static/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/openapi.json").json()["paths"].keys() >= {
        "/search", "/images", "/images/{image_id}", "/images/{image_id}/info", "/thumbnails/{image_id}",
        "/health", "/stats"
    }


def test_api_docs_are_served_by_the_app(client: TestClient) -> None:
    """Swagger UI from the fastapi-offline package, under the same strict CSP: no CDN."""
    r = client.get("/docs")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in r.text and "<script>" not in r.text  # no external or inline script
    for asset, kind, marker in (
        ("static/swagger/swagger-ui-bundle.js", "javascript", b"SwaggerUIBundle"),
        ("static/swagger/swagger-ui.css", "text/css", b".swagger-ui"),
        ("static/docs.js", "javascript", b'url: "openapi.json"'),
    ):
        assert f'"{asset}"' in r.text
        a = client.get("/" + asset)
        assert a.status_code == 200 and kind in a.headers["content-type"] and marker in a.content


def test_search_by_upload(client: TestClient, collection: Path) -> None:
    data = (collection / "img_03.jpg").read_bytes()
    r = client.post("/search", files={"image": ("q.bin", data, "application/octet-stream")},
                    data={"k": "5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["type"] == "upload" and body["query"]["format"] == "JPEG"
    assert body["count"] == 5 == len(body["results"])
    top = body["results"][0]
    assert top["path"] == "img_03.jpg"  # relative to the indexed root, not absolute
    assert top["score"] == pytest.approx(1.0, abs=1e-3)
    assert top["thumbnail"] == f"/thumbnails/{top['id']}" and top["image"] == f"/images/{top['id']}"
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(not h["path"].startswith("/") for h in body["results"])


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_search_by_heic_and_avif_upload(client: TestClient, collection: Path, fmt: str) -> None:
    """Phones' HEIC and AVIF uploads are sniffed, decoded and searched like the CLI reads them."""
    from cbir.data.decode import register_heif

    if not register_heif() and fmt == "HEIF":
        pytest.skip("pillow-heif is not installed")
    buf = io.BytesIO()
    with Image.open(collection / "img_03.jpg") as img:
        img.convert("RGB").save(buf, format=fmt, quality=95)
    r = client.post("/search", files={"image": ("q.bin", buf.getvalue(), "application/octet-stream")},
                    data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["format"] == fmt
    assert body["results"][0]["path"] == "img_03.jpg"


def test_search_by_id_and_options(client: TestClient, index: Index) -> None:
    qid = _some_id(index)
    r = client.post("/search", data={"id": str(qid), "k": "3"})
    assert r.status_code == 200, r.text
    ids = [h["id"] for h in r.json()["results"]]
    assert ids[0] == qid and len(ids) == 3
    r = client.post("/search", data={"id": str(qid), "k": "3", "exclude_self": "true"})
    assert qid not in [h["id"] for h in r.json()["results"]]
    r = client.post("/search", data={"id": str(qid), "k": "4", "qe": "2", "alpha": "3"})
    assert r.status_code == 200 and r.json()["count"] == 4
    sub = client.post("/search", data={"id": str(qid), "k": "12"}).json()["results"]
    assert {"sub/a.png", "sub/b.png"} <= {h["path"] for h in sub}


def test_min_score_drops_less_similar_results(client: TestClient, index: Index) -> None:
    qid = _some_id(index)
    everything = client.post("/search", data={"id": str(qid), "k": "12"}).json()
    scores = [h["score"] for h in everything["results"]]
    cut = scores[5]
    r = client.post("/search", data={"id": str(qid), "k": "12", "min_score": str(cut)}).json()
    assert r["min_score"] == cut and [h["score"] for h in r["results"]] == [s for s in scores if s >= cut]
    assert client.post("/search", data={"id": str(qid), "min_score": "1.5"}).status_code == 422


def test_collection_is_listed_page_by_page(client: TestClient, index: Index) -> None:
    first = client.get("/images", params={"limit": 5}).json()
    assert first["total"] == len(index) == 12 and first["offset"] == 0 and len(first["items"]) == 5
    pages = [first] + [client.get("/images", params={"offset": o, "limit": 5}).json() for o in (5, 10)]
    items = [item for page in pages for item in page["items"]]
    assert [len(p["items"]) for p in pages] == [5, 5, 2]
    ids = [item["id"] for item in items]
    assert ids == sorted(ids) and len(set(ids)) == 12  # catalogue order, each once
    assert {item["path"] for item in items} >= {"img_00.jpg", "sub/a.png"}
    assert all(i["thumbnail"] == f"/thumbnails/{i['id']}" and i["image"] == f"/images/{i['id']}" for i in items)
    assert client.get("/images", params={"offset": 50}).json()["items"] == []
    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}, {"offset": 2**63}):
        r = client.get("/images", params=bad)
        assert r.status_code == 422 and _error(r)["code"] == "invalid_request"


def test_image_info_from_the_header(client: TestClient, index: Index, collection: Path) -> None:
    qid = _some_id(index)
    info = client.get(f"/images/{qid}/info").json()
    assert info["path"] == "img_00.jpg" and info["format"] == "JPEG"
    assert (info["width"], info["height"]) == (96, 72)  # make_image's default size
    assert info["bytes"] == (collection / "img_00.jpg").stat().st_size
    assert info["image"] == f"/images/{qid}"
    assert client.get("/images/987654/info").status_code == 404


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({}, 422, "bad_query"),
        ({"id": "1", "k": "0"}, 422, "invalid_request"),
        ({"id": "1", "k": "101"}, 422, "k_too_large"),
        ({"id": "1", "qe": "-1"}, 422, "invalid_request"),
        ({"id": "1", "qe": "51"}, 422, "qe_too_large"),
        ({"id": "abc"}, 422, "invalid_request"),
        ({"id": "999999"}, 404, "image_not_found"),
    ],
)
def test_search_bad_requests(client: TestClient, form: dict, status: int, code: str) -> None:
    r = client.post("/search", data=form)
    assert r.status_code == status
    assert _error(r)["code"] == code


def test_search_with_both_image_and_id_is_refused(client: TestClient) -> None:
    r = client.post("/search", data={"id": "1"}, files={"image": ("a.png", _png(), "image/png")})
    assert r.status_code == 422 and _error(r)["code"] == "bad_query"


# -- upload limits and content sniffing ---------------------------------------------------------
def test_upload_too_large_is_413(client: TestClient) -> None:
    big = _png((400, 400))  # random pixels: ~480 KB of PNG, over the 200 KB limit
    assert len(big) > 200_000
    r = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413
    assert _error(r)["code"] == "too_large"


def test_streamed_upload_over_the_limit_is_413(client: TestClient) -> None:
    """No Content-Length (chunked): the body is counted as it arrives and cut off."""
    boundary = "cbirtestboundary"

    def body():
        yield (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(50):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/search", content=body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert _error(r)["code"] == "too_large"


def test_non_image_is_415_whatever_its_name(client: TestClient) -> None:
    for name, data, ctype in [
        ("cat.jpg", b"#!/bin/sh\necho owned\n", "image/jpeg"),
        ("x.png", b"%PDF-1.7\n1 0 obj\n", "image/png"),
        ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
         "image/svg+xml"),
        ("page.gif", b"<html><body>hi</body></html>", "image/gif"),
    ]:
        r = client.post("/search", files={"image": (name, data, ctype)})
        assert r.status_code == 415, name
        assert _error(r)["code"] == "unsupported_media_type"


def test_image_with_wrong_name_and_type_is_accepted(client: TestClient) -> None:
    r = client.post("/search", files={"image": ("notes.txt", _png(), "text/plain")})
    assert r.status_code == 200 and r.json()["query"]["format"] == "PNG"


def test_undecodable_image_is_422(client: TestClient) -> None:
    truncated = _png((64, 64))[:120]  # a real PNG signature and header, then nothing
    r = client.post("/search", files={"image": ("t.png", truncated, "image/png")})
    assert r.status_code == 422 and _error(r)["code"] == "undecodable_image"
    r = client.post("/search", files={"image": ("e.png", b"", "image/png")})
    assert r.status_code == 422 and _error(r)["code"] == "empty_upload"


def test_decompression_bomb_is_refused(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("L", (2000, 1000)).save(buf, format="PNG")  # 2 Mpx of zeros: ~2 KB compressed
    assert len(buf.getvalue()) < 200_000
    r = client.post("/search", files={"image": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 422
    err = _error(r)
    assert err["code"] == "too_many_pixels" and "1,000,000" in err["message"]


# -- files by catalogue id only -----------------------------------------------------------------
def test_image_and_thumbnail(client: TestClient, index: Index, collection: Path) -> None:
    qid = _some_id(index)
    r = client.get(f"/images/{qid}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (collection / "img_00.jpg").read_bytes()
    t = client.get(f"/thumbnails/{qid}")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(t.content))
    assert max(thumb.size) <= 256
    again = client.get(f"/thumbnails/{qid}", headers={"If-None-Match": t.headers["etag"]})
    assert again.status_code == 304
    stats = client.get("/stats").json()["server"]["thumbnails"]
    assert stats["items"] >= 1 and stats["hits"] >= 1


@pytest.mark.parametrize("endpoint", ["images", "thumbnails"])
def test_unknown_ids_are_404(client: TestClient, endpoint: str) -> None:
    r = client.get(f"/{endpoint}/987654")
    assert r.status_code == 404 and _error(r)["code"] == "image_not_found"


TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "..\\..\\windows\\win.ini",
    "1/../../etc/passwd",
    "1%00.jpg",
    "-1",
]


@pytest.mark.parametrize("attempt", TRAVERSALS)
@pytest.mark.parametrize("prefix", ["/images/", "/thumbnails/", "/static/"])
def test_path_traversal_is_refused(client: TestClient, prefix: str, attempt: str) -> None:
    r = client.get(prefix + attempt)
    assert r.status_code in (400, 404, 422), (prefix, attempt, r.status_code)
    assert b"root:" not in r.content and b"[fonts]" not in r.content
    if r.headers.get("content-type", "").startswith("application/json"):
        _error(r)


def test_file_outside_the_roots_is_not_served(index: Index, settings: ServeSettings,
                                              tmp_path: Path) -> None:
    """A catalogue entry pointing outside every allowed root (e.g. via a symlink) is refused."""
    outside = make_image(tmp_path / "elsewhere" / "secret.jpg", seed=55)
    link = Path(index.roots[0]) / "link.jpg"
    os.symlink(outside, link)
    try:
        index.add([link], progress=False, workers=0)
        rec_id = next(h.id for h in index.search(str(link), k=20) if h.path == str(link))
        with TestClient(create_app(index, settings), raise_server_exceptions=False) as c:
            assert c.get(f"/images/{rec_id}").status_code == 404
            assert c.get(f"/thumbnails/{rec_id}").status_code == 404
    finally:
        index.remove([str(link)])
        link.unlink()


def test_file_gone_from_disk_is_404(client: TestClient, index: Index) -> None:
    extra = make_image(Path(index.roots[0]) / "gone.jpg", seed=66)
    index.add([extra], progress=False, workers=0)
    image_id = next(h.id for h in index.search(str(extra), k=20) if h.path == str(extra))
    try:
        assert client.get(f"/images/{image_id}").status_code == 200
        extra.unlink()
        for endpoint in ("images", "thumbnails"):
            r = client.get(f"/{endpoint}/{image_id}")
            assert r.status_code == 404 and _error(r)["code"] == "image_missing"
    finally:
        index.remove([image_id])


def test_thumbnail_cache_is_bounded_and_follows_file_changes(tmp_path: Path) -> None:
    from cbir.serve.thumbnails import ThumbnailCache

    files = [make_image(tmp_path / f"t{i}.png", seed=i, size=(300, 200)) for i in range(4)]
    one = ThumbnailCache(size=64).get(0, files[0])
    cache = ThumbnailCache(size=64, max_bytes=int(len(one.data) * 2.5))
    for i, f in enumerate(files):
        thumb = cache.get(i, f)
        assert max(Image.open(io.BytesIO(thumb.data)).size) == 64
    stats = cache.stats()
    assert stats["bytes"] <= cache.max_bytes and stats["items"] < len(files)
    assert cache.get(3, files[3]) is cache.get(3, files[3])  # most recent: still cached
    before = cache.get(3, files[3])
    make_image(files[3], seed=99, size=(300, 200))  # the file changes on disk
    os.utime(files[3], ns=(time.time_ns() + 10**9,) * 2)
    after = cache.get(3, files[3])
    assert after.etag != before.etag and after.data != before.data


# -- write endpoints ----------------------------------------------------------------------------
def test_add_search_and_remove(client: TestClient, index: Index, settings: ServeSettings) -> None:
    before = len(index)
    data = _png((80, 60), seed=11)
    r = client.post("/images", files={"image": ("../../evil.sh", data, "image/png")}, headers=AUTH)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["added"] is True and new["path"].startswith("uploads/") and ".." not in new["path"]
    stored = list(settings.upload_dir.iterdir())
    # stored under a content-derived name, not the client's
    assert len(stored) == 1 and stored[0].suffix == ".png"
    assert len(index) == before + 1
    listed = client.get("/images", params={"offset": before, "limit": 5}).json()
    assert listed["total"] == before + 1 and listed["items"][-1]["path"] == new["path"]
    again = client.post("/images", files={"image": ("x.png", data, "image/png")}, headers=AUTH)
    assert again.status_code == 200 and again.json()["id"] == new["id"]
    hits = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "1"})
    assert hits.json()["results"][0]["id"] == new["id"]
    assert client.get(f"/images/{new['id']}").content == data
    r = client.delete(f"/images/{new['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"removed": new["id"]}
    assert len(index) == before and not stored[0].exists()
    assert client.delete(f"/images/{new['id']}", headers=AUTH).status_code == 404
    assert client.get(f"/images/{new['id']}").status_code == 404


def test_add_rejects_bad_uploads(client: TestClient) -> None:
    exe = b"MZ\x90\x00" + bytes(60)
    r = client.post("/images", files={"image": ("a.jpg", exe, "image/jpeg")}, headers=AUTH)
    assert r.status_code == 415
    r = client.post("/images", files={"image": ("a.png", _png((400, 400)), "image/png")},
                    headers=AUTH)
    assert r.status_code == 413
    r = client.post("/images", data={"other": "x"}, headers=AUTH)
    assert r.status_code == 422


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_token"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "invalid_token"),
        ({"Authorization": TOKEN}, "missing_token"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing_token"),
        ({"Authorization": "Bearer "}, "missing_token"),
    ],
)
def test_writes_need_the_token(client: TestClient, index: Index, headers: dict, code: str) -> None:
    before = len(index)
    r = client.post("/images", files={"image": ("a.png", _png(), "image/png")}, headers=headers)
    assert r.status_code == 401 and _error(r)["code"] == code
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.delete(f"/images/{_some_id(index)}", headers=headers)
    assert r.status_code == 401
    assert len(index) == before


def test_read_only_server_refuses_writes(index: Index) -> None:
    with TestClient(create_app(index, ServeSettings(refresh_seconds=0)),
                    raise_server_exceptions=False) as c:
        r = c.post("/images", files={"image": ("a.png", _png(), "image/png")}, headers=AUTH)
        assert r.status_code == 403 and _error(r)["code"] == "writes_disabled"
        assert c.delete("/images/1", headers=AUTH).status_code == 403
        assert c.get("/stats").json()["server"]["writes"] is False


def test_changes_from_another_writer_are_picked_up(index: Index, tmp_path: Path) -> None:
    """A ``cbir index`` run in another process while serving: the server reloads by itself."""
    settings = ServeSettings(refresh_seconds=0.2)
    other = Index.open(index.folder)  # a second handle, as another process would have
    extra = make_image(Path(index.roots[0]) / "late.jpg", seed=77)
    try:
        with TestClient(create_app(index, settings), raise_server_exceptions=False) as c:
            def top_hit() -> str:
                files = {"image": ("q.jpg", extra.read_bytes(), "image/jpeg")}
                return c.post("/search", files=files, data={"k": "1"}).json()["results"][0]["path"]

            before = c.get("/health").json()["images"]
            assert top_hit() != "late.jpg"
            other.add([extra], progress=False, workers=0)
            deadline = time.monotonic() + 30
            while top_hit() != "late.jpg":
                assert time.monotonic() < deadline, "the server never saw the new image"
                time.sleep(0.2)
            assert c.get("/health").json()["images"] == before + 1
    finally:
        other.remove([str(extra)])
        other.close()
        extra.unlink()
        index.refresh()


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = client.put("/search")
    assert r.status_code == 405 and _error(r)


class _Busy(CbirError):
    http_status = 503
    code = "index_busy"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (_Busy("another process is writing"), 503, "index_busy"),  # a class's own status and code
        (CbirError("plain"), 400, "bad_request"),  # the base's defaults
        (RuntimeError("secret /home/user/path detail"), 500, "internal_error"),  # a bug
    ],
)
def test_errors_are_mapped_by_class_and_bugs_do_not_leak(
    index: Index, settings: ServeSettings, monkeypatch, error: Exception, status: int, code: str
) -> None:
    """One handler for every CbirError; anything else is a 500 naming the request id."""

    def fail(*args, **kwargs):
        raise error

    app = create_app(index, settings)
    monkeypatch.setattr(index, "stats", fail)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/stats")
    assert r.status_code == status
    err = _error(r)
    assert err["code"] == code
    if isinstance(error, CbirError):
        assert err["message"] == str(error)
    else:
        assert "secret" not in err["message"] and r.headers["x-request-id"] in err["message"]


def test_requests_are_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="cbir.serve"):
        client.get("/health", headers=AUTH)
        client.get("/images/..%2Fsecret%0Aforged-line")
    lines = [r.getMessage() for r in caplog.records if r.name == "cbir.serve"]
    assert any("GET /health 200" in line for line in lines)
    assert not any(TOKEN in line for line in lines)
    assert all("\n" not in line for line in lines)


# -- settings and security helpers --------------------------------------------------------------
def test_refuses_writes_on_public_host_without_token(index: Index, tmp_path: Path) -> None:
    with pytest.raises(ServeConfigError, match="not a loopback"):
        create_app(index, ServeSettings(host="0.0.0.0", writes=True, upload_dir=tmp_path))
    with pytest.raises(ServeConfigError, match="token"):
        create_app(index, ServeSettings(host="127.0.0.1", writes=True, upload_dir=tmp_path))
    # read-only on a public address, or writes with a token, are fine
    create_app(index, ServeSettings(host="0.0.0.0", refresh_seconds=0))
    create_app(index, ServeSettings(host="0.0.0.0", writes=True, token=TOKEN, upload_dir=tmp_path))


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("[::1]") and is_loopback("127.8.9.10")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("10.0.0.1") and not is_loopback("no-such-host.invalid")


def test_token_file_rules(tmp_path: Path) -> None:
    f = tmp_path / "token"
    with pytest.raises(ServeConfigError, match="does not exist"):
        read_token_file(f)
    f.write_text("short\n")
    with pytest.raises(ServeConfigError, match="at least"):
        read_token_file(f)
    f.write_text(f"  {TOKEN}\n")
    assert read_token_file(f) == TOKEN
    made = write_new_token(tmp_path / "new" / "token")
    assert read_token_file(tmp_path / "new" / "token") == made
    assert (tmp_path / "new" / "token").stat().st_mode & 0o077 == 0
    assert token_matches(TOKEN, TOKEN) and not token_matches(TOKEN, TOKEN + "x")


def test_sniffing_uses_content_only() -> None:
    assert sniff_image_format(_png()) == "PNG"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    assert sniff_image_format(buf.getvalue()) == "JPEG"
    assert sniff_image_format(b"GIF89a\x01\x00") == "GIF"
    assert sniff_image_format(b"<svg") is None and sniff_image_format(b"") is None
