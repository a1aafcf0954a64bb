"""The HTTP API and web page over an :class:`cbir.index.Index`: ``create_app(index, settings)``.

The app is assembled from parts, each in its own module:

* :mod:`cbir.serve.state`: the one dependency (``State``) that hands endpoints the
  index, the settings and the thread lanes, and the token check for writes;
* :mod:`cbir.serve.routes`: the routers (search, images, collection, admin, pages);
* :mod:`cbir.serve.errors`: one handler for every :class:`cbir.errors.CbirError` (their
  classes carry the HTTP status and code), one JSON error shape;
* :mod:`cbir.serve.middleware`: request log, request ids, security headers;
* :mod:`cbir.serve.server`: uvicorn with connection limits (not part of the ASGI app).

The endpoints call the index's public methods only (``search``, ``get``, ``add``,
``remove``, ``stats``), so the server does what the Python API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from cbir.index import Index
from cbir.serve.errors import install_error_handlers
from cbir.serve.middleware import RequestLogAndHeaders
from cbir.serve.routes import ROUTERS
from cbir.serve.routes.pages import mount_static
from cbir.serve.settings import ServeSettings
from cbir.serve.state import ServerState

log = logging.getLogger("cbir.serve")


def create_app(index: Index, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``index``.

    The caller owns ``index`` (opens and closes it). Raises
    :class:`cbir.serve.security.ServeConfigError` for unsafe settings, e.g. write
    endpoints without a token.
    """
    settings = settings or ServeSettings()
    settings.validate()
    state = ServerState(index, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        refresher = None
        if settings.refresh_seconds > 0:
            refresher = asyncio.create_task(_refresh_loop(state, settings.refresh_seconds))
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            state.shutdown()

    app = FastAPI(
        title="cbir image search",
        summary="Content-based image retrieval over an indexed collection.",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # served offline by routes.pages
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.server = state
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    mount_static(app)
    # Innermost first: Starlette's limiter counts body bytes as they arrive (413 without
    # spooling an oversized upload); our middleware answers a declared oversize
    # Content-Length at once, in the API's JSON error shape, and logs every request.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_upload_bytes)
    app.add_middleware(RequestLogAndHeaders, enabled=settings.log_requests, max_body=settings.max_upload_bytes)
    return app


async def _refresh_loop(state: ServerState, every: float) -> None:
    """Pick up what other processes commit (``cbir index`` run while serving).

    ``Index.refresh`` compares one generation counter and reloads only on a change;
    it runs on the writer thread so it never races the server's own writes.
    """
    while True:
        await asyncio.sleep(every)
        try:
            if await state.write(state.index.refresh):
                log.info("index changed on disk: reloaded")
        except Exception as exc:  # a failed refresh must not stop the loop
            log.warning("index refresh failed: %s", exc)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cbir")
    except Exception:
        return "0"
