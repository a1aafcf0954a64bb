"""The web page at ``/``, its static files, and the API docs (Swagger UI) at ``/docs``.

Everything the browser loads comes from this server: the page is plain JavaScript with
no dependencies, and Swagger UI's script and style sheet are the copies shipped in the
``fastapi-offline`` package (FastAPI's own ``/docs`` loads them from a CDN, so it is
blank without internet). Both pages work under the strict Content-Security-Policy of
:mod:`cbir.serve.middleware`: no inline script, Swagger UI started by ``static/docs.js``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(str(resources.files("cbir.serve") / "static"))
#: Swagger UI's distribution files (swagger-ui-bundle.js, swagger-ui.css), from a package.
SWAGGER_DIR = Path(str(resources.files("fastapi_offline") / "static"))

router = APIRouter(include_in_schema=False)
_NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)


@router.get("/docs")
async def docs() -> FileResponse:
    return FileResponse(STATIC_DIR / "docs.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)


def mount_static(app: FastAPI) -> None:
    """Serve the page's files under /static and Swagger UI's under /static/swagger (first:
    routes match in order, and /static would take its paths)."""
    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_DIR), name="swagger")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
