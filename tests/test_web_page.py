"""The search page in a real headless browser (Debian's chromium driven by Playwright).

Upload an image, see the grid of results, click a result, see the new grid; a
screenshot goes to test-artifacts/. Skipped, saying why, only where Playwright or
the browser is not available (``scripts/install_browser.sh`` installs it).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import make_image

from cbir.index import Index
from cbir.serve import ServeSettings, create_app

CHROMIUM = os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: run scripts/install_browser.sh (needs apt)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as exc:
            pytest.skip(f"cannot launch {CHROMIUM}: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, tiny_descriptor):
    """A real uvicorn server on loopback (the browser needs a socket, not a test client)."""
    import uvicorn

    base = tmp_path_factory.mktemp("web")
    for i in range(16):
        make_image(base / "photos" / f"photo_{i:02d}.jpg", seed=300 + i, size=(120, 90))
    index = Index.create(base / "db", model=tiny_descriptor)
    index.sync([base / "photos"], progress=False, workers=0)
    app = create_app(index, ServeSettings(search_threads=2, refresh_seconds=0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", base / "photos"
    server.should_exit = True
    thread.join(timeout=10)
    index.close()


def _wait_for_thumbnails(page, timeout: float = 30.0) -> None:
    """Poll (page.evaluate runs over the DevTools protocol, which the page's strict CSP
    allows; Playwright's wait_for_function would need 'unsafe-eval')."""
    deadline = time.monotonic() + timeout
    script = (
        "() => [...document.querySelectorAll('#results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    while not page.evaluate(script):
        assert time.monotonic() < deadline, "thumbnails did not load"
        time.sleep(0.1)


def test_upload_then_click_a_result(browser, server_url) -> None:
    from playwright.sync_api import expect

    url, photos = server_url
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(url)
        expect(page.locator("#collection")).to_have_attribute("data-images", "16")
        expect(page.locator("#collection")).to_contain_text("16 images")
        expect(page.locator("#collection")).to_contain_text("resnet10t")  # the descriptor

        # 1. upload an image: a grid of results with thumbnails and scores
        page.set_input_files("#file", str(photos / "photo_05.jpg"))
        cards = page.locator("#results .result")
        expect(page.locator("#status")).to_contain_text("results for")
        expect(cards).to_have_count(16)  # k=24 by default, 16 images indexed
        expect(cards.first.locator(".score")).to_have_text("1.000")
        expect(cards.first.locator(".path")).to_have_text("photo_05.jpg")
        _wait_for_thumbnails(page)
        first_grid = [cards.nth(i).get_attribute("data-id") for i in range(cards.count())]

        # 2. click another result: a new grid, led by the clicked image itself
        clicked = cards.nth(3)
        clicked_id = clicked.get_attribute("data-id")
        clicked_path = clicked.locator(".path").inner_text()
        clicked.click()
        expect(page.locator("#results")).to_have_attribute(
            "data-query", f"#{clicked_id} ({clicked_path})"
        )
        expect(cards.first).to_have_attribute("data-id", clicked_id)
        _wait_for_thumbnails(page)
        new_grid = [cards.nth(i).get_attribute("data-id") for i in range(cards.count())]
        assert new_grid[0] == clicked_id and new_grid != first_grid
        expect(page.locator("#status")).to_contain_text(clicked_path)
        assert page.url.endswith(f"#id={clicked_id}")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
        assert (ARTIFACTS / "web-page.png").stat().st_size > 0

        # 3. a non-image is refused with the API's message, shown on the page
        bad = photos.parent / "notes.jpg"
        bad.write_text("not an image")
        page.set_input_files("#file", str(bad))
        expect(page.locator("#status")).to_have_class("status error")
        expect(page.locator("#status")).to_contain_text("not an image")
    finally:
        page.close()
    # the page loads nothing from outside and breaks no Content-Security-Policy rule
    # (the one expected console error is the browser reporting the 415 response)
    assert [p for p in problems if "415" not in p] == [], problems
