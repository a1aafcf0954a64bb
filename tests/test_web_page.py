"""The web page and the API docs in a real headless browser (Debian's chromium, Playwright).

Browse the collection page by page, open an image in the large view, search similar
images from there, narrow the results with the similarity cut-off, search by an upload,
and load ``/docs`` with every request off this machine blocked (Swagger UI is served by
the app). Screenshots go to test-artifacts/. ``scripts/test.sh`` installs the browser
(``scripts/install_browser.sh``); where Playwright or the browser is missing the tests
are skipped and say why, except in CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import make_image
from live_server import free_port, running_server

from cbir.index import Index
from cbir.serve import ServeSettings

CHROMIUM = os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium")
#: The flags this machine needs (/work/.library/env/machines/python.md): as root, no
#: sandbox; no background networking, which the closed network refuses many times over.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PHOTOS = 16


def _unavailable(reason: str) -> None:
    """Skip, saying why; in CI (``CI=true``, where scripts/test.sh installs the browser)
    fail instead, so the browser tests cannot silently stop running."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"no browser at {CHROMIUM}: run scripts/install_browser.sh (needs apt)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as exc:
            _unavailable(f"cannot launch {CHROMIUM}: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, tiny_descriptor) -> Iterator[tuple[str, Path]]:
    """A real uvicorn server on loopback (the browser needs a socket, not a test client)."""
    base = tmp_path_factory.mktemp("web")
    for i in range(PHOTOS):
        make_image(base / "photos" / f"photo_{i:02d}.jpg", seed=300 + i, size=(120, 90))
    with Index.create(base / "db", model=tiny_descriptor) as index:
        index.sync([base / "photos"], progress=False, workers=0)
        settings = ServeSettings(port=free_port(), search_threads=2, refresh_seconds=0, log_requests=False)
        with running_server(index, settings) as port:
            yield f"http://127.0.0.1:{port}/", base / "photos"


@pytest.fixture
def page(browser) -> Iterator:
    """A page that fails the test on any console error or request off this machine."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(str(e)))

    def only_loopback(route) -> None:
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:  # "no network": what the page would try to fetch from elsewhere fails
            page.problems.append(f"off-machine request: {route.request.url}")
            route.abort()

    page.route("**/*", only_loopback)
    yield page
    page.close()


def _wait_for_images(page, selector: str, timeout: float = 30.0) -> None:
    """Poll (page.evaluate runs over the DevTools protocol, which the page's strict CSP
    allows; Playwright's wait_for_function would need 'unsafe-eval')."""
    deadline = time.monotonic() + timeout
    script = f"() => [...document.querySelectorAll({selector!r})].every(i => i.complete && i.naturalWidth > 0)"
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"images {selector} did not load"
        time.sleep(0.1)


def _cards(page, attribute: str, visible_only: bool = False) -> list[str]:
    """``data-<attribute>`` of the result cards, in grid order."""
    selector = "#results .result" + (":not([hidden])" if visible_only else "")
    return page.evaluate(f"() => [...document.querySelectorAll({selector!r})].map(c => c.dataset.{attribute})")


def test_browse_open_large_view_and_search_similar(page, server_url) -> None:
    from playwright.sync_api import expect

    url, _ = server_url
    page.goto(url)
    header = page.locator("#collection")
    expect(header).to_have_text(f"{PHOTOS} images · model resnet10t")  # plain words, no "gem(p=3.0)"
    cards = page.locator("#results .result")
    expect(cards).to_have_count(PHOTOS)  # the collection, with no query
    expect(page.locator("#results")).to_have_attribute("data-mode", "browse")

    # 1. a paged grid: 12 a page, then the second page
    page.select_option("#count", "12")
    expect(page.locator("#page-info")).to_have_text("Page 1 of 2")
    expect(cards).to_have_count(12)
    expect(page.locator("#prev")).to_be_disabled()
    page.click("#next")
    expect(page.locator("#page-info")).to_have_text("Page 2 of 2")
    expect(cards).to_have_count(PHOTOS - 12)
    expect(page.locator("#status")).to_have_text(f"Images 13–{PHOTOS} of {PHOTOS}")
    assert page.url.endswith("#page=2")
    _wait_for_images(page, "#results img")
    assert cards.first.locator(".score").count() == 0  # browsing: no scores

    # 2. a click opens the large view: the image, its path and its size
    chosen = cards.nth(1)
    chosen_id, chosen_path = chosen.get_attribute("data-id"), chosen.locator(".path").inner_text()
    chosen.click()
    viewer = page.locator("#viewer")
    expect(viewer).to_have_attribute("open", "")
    expect(page.locator("#viewer-path")).to_have_text(chosen_path)
    expect(page.locator("#viewer-size")).to_contain_text("120 × 90 pixels · ")
    expect(page.locator("#viewer-size")).to_contain_text("KB · JPEG")
    _wait_for_images(page, "#viewer-image")
    assert page.evaluate("() => document.getElementById('viewer-image').naturalWidth") == 120
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-viewer.png"))

    # 3. "Search similar": results led by the image itself, with scores
    page.click("#viewer-search")
    expect(viewer).not_to_have_attribute("open", "")
    expect(page.locator("#results")).to_have_attribute("data-query", f"“{chosen_path}”")
    expect(page.locator("#results")).to_have_attribute("data-mode", "results")
    expect(cards).to_have_count(12)  # k follows "Show"
    expect(cards.first).to_have_attribute("data-id", chosen_id)
    expect(cards.first.locator(".score")).to_have_text("1.000")
    assert page.url.endswith(f"#id={chosen_id}")

    # 4. the similarity cut-off hides the less similar results
    scores = [float(s) for s in _cards(page, "score")]
    cutoff = math.floor(scores[len(scores) // 2] * 100) / 100
    page.locator("#cutoff").fill(f"{cutoff:.2f}")
    expected = [i for i, s in zip(_cards(page, "id"), scores, strict=True) if s >= cutoff]
    assert _cards(page, "id", visible_only=True) == expected and 0 < len(expected) < len(scores)
    expect(page.locator("#status")).to_contain_text(f"less similar than {cutoff:.2f} hidden")
    _wait_for_images(page, "#results .result:not([hidden]) img")
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    # 5. back to the collection
    page.click("#browse")
    expect(page.locator("#results")).to_have_attribute("data-mode", "browse")
    expect(page.locator("#page-info")).to_have_text("Page 1 of 2")
    assert page.problems == [], page.problems


def test_search_by_upload_and_a_refused_file(page, server_url) -> None:
    from playwright.sync_api import expect

    url, photos = server_url
    page.goto(url)
    expect(page.locator("#results .result")).to_have_count(PHOTOS)
    page.set_input_files("#file", str(photos / "photo_05.jpg"))
    cards = page.locator("#results .result")
    expect(page.locator("#status")).to_contain_text("results for “photo_05.jpg”")
    expect(cards.first.locator(".path")).to_have_text("photo_05.jpg")
    expect(cards.first.locator(".score")).to_have_text("1.000")
    expect(cards).to_have_count(PHOTOS)  # 48 asked, 16 indexed

    bad = photos.parent / "notes.jpg"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#status")).to_have_class("status error")
    expect(page.locator("#status")).to_contain_text("not an image")
    # the one console error is the browser reporting the 415 response itself
    assert [p for p in page.problems if "415" not in p] == [], page.problems


def test_api_docs_load_with_no_network(page, server_url) -> None:
    """Swagger UI's script and styles come from the app (fastapi-offline's copies): with
    every request off this machine refused, /docs still lists every endpoint."""
    from playwright.sync_api import expect

    url, _ = server_url
    page.goto(url + "docs")
    operations = page.locator(".opblock")
    expect(operations.first).to_be_visible(timeout=30_000)
    paths = page.evaluate("() => [...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)")
    assert {"/search", "/images", "/images/{image_id}", "/images/{image_id}/info", "/stats"} <= set(paths)
    expect(page.locator(".info .title")).to_contain_text("cbir image search")
    assert page.problems == [], page.problems  # no blocked request, no CSP violation
