"""The HTTP API and web page over an :class:`cbir.index.Index`: ``create_app(index, settings)``.

Design choices, each for a reason:

* The descriptor model lives in the index and is loaded once, before the app exists;
  requests only call ``index.search``/``add``/``remove``.
* Searches run in thread pools sized to the machine, so slow searches never block
  the event loop and several run at once (PyTorch, ONNX Runtime and FAISS release the
  GIL): one lane for image queries (decode + model), one for look-ups by stored vector,
  thumbnails and stats, so cheap requests do not queue behind expensive ones. Writes
  run on one separate thread: they are serialised and never take a search thread; the
  index's own locking keeps searches consistent meanwhile.
* Files are only ever served by catalogue id: the request names an id, the catalogue
  names the file, and the file must still lie under one of the indexed roots.
* Every error is ``{"error": {"status", "code", "message"}}``; tracebacks go to the
  log under a request id, never to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cbir.data.decode import DecodeError, image_size, load_image
from cbir.fileio import atomic_write_bytes
from cbir.index import (
    DescriptorMismatchError,
    Index,
    IndexBusyError,
    IndexError_,
    IndexNotTrainedError,
    QueryError,
)
from cbir.serve.errors import ApiError, error_body
from cbir.serve.security import (
    MIME_TYPES,
    SUFFIXES,
    bearer_token,
    sniff_file_format,
    sniff_image_format,
    token_matches,
)
from cbir.serve.settings import ServeSettings
from cbir.serve.thumbnails import ThumbnailCache

log = logging.getLogger("cbir.serve")
T = TypeVar("T")

STATIC_DIR = Path(str(resources.files("cbir.serve") / "static"))

#: Content-Security-Policy for the page and API: only our own scripts, styles and images.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: FastAPI's Swagger UI at /docs loads its assets from a CDN; the strict policy would blank it.
_NO_CSP_PATHS = ("/docs", "/docs/oauth2-redirect")


# -- response models (they make the OpenAPI schema at /docs precise) ---------------------------
class SearchResult(BaseModel):
    id: int
    path: str
    score: float
    thumbnail: str
    image: str


class SearchResponse(BaseModel):
    query: dict[str, Any]
    k: int
    count: int
    took_ms: float
    results: list[SearchResult]


class AddResponse(BaseModel):
    id: int
    path: str
    added: bool


class RemoveResponse(BaseModel):
    removed: int


class HealthResponse(BaseModel):
    status: str
    images: int


# -- middleware --------------------------------------------------------------------------------
def _printable(text: str, limit: int = 200) -> str:
    """A request path made safe for a log line (no control characters, bounded length)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class RequestLogAndHeaders:
    """Log one line per request and add a request id and security headers to every response.

    Unexpected exceptions become a JSON 500 naming the request id (traceback in the log
    only). Also answers a request whose declared ``Content-Length`` exceeds ``max_body`` with
    a JSON 413 before anything reads the body.
    """

    def __init__(self, app: ASGIApp, enabled: bool = True, max_body: int | None = None) -> None:
        self.app = app
        self.enabled = enabled
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = False
        path = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                if path not in _NO_CSP_PATHS:
                    headers.append((b"content-security-policy", _CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            declared = _declared_length(scope)
            if self.max_body is not None and declared is not None and declared > self.max_body:
                response = JSONResponse(
                    error_body(413, f"request body over the limit of {self.max_body:,} bytes"),
                    413,
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            # The traceback stays in the server log; the client gets the request id to quote.
            log.exception("request %s failed", request_id)
            if started:
                raise
            response = JSONResponse(
                error_body(500, f"internal error (request id {request_id})", "internal_error"), 500
            )
            await response(scope, receive, send_with_headers)
        finally:
            if self.enabled:
                client = scope.get("client") or ("-", 0)
                log.info(
                    "%s %s %s %d %.1fms id=%s",
                    client[0],
                    scope.get("method", "-"),
                    _printable(path),
                    status,
                    (time.perf_counter() - start) * 1000,
                    request_id,
                )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# -- the application ---------------------------------------------------------------------------
class _Server:
    """State shared by the endpoints: the index, the pools, the thumbnail cache."""

    def __init__(self, index: Index, settings: ServeSettings) -> None:
        self.index = index
        self.settings = settings
        # Two lanes, each sized to the machine: image queries (decode + model, tens of
        # milliseconds) and look-ups (search by a stored vector, thumbnails, stats: about
        # a millisecond of FAISS or SQLite). Without the split, a click on a result waits
        # behind every queued upload, although its own work is a thousand times smaller.
        self.model_pool = ThreadPoolExecutor(
            settings.search_threads, thread_name_prefix="cbir-model"
        )
        self.lookup_pool = ThreadPoolExecutor(
            settings.search_threads, thread_name_prefix="cbir-lookup"
        )
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="cbir-write")
        self.thumbnails = ThumbnailCache(
            settings.thumbnail_size, settings.thumbnail_cache_bytes, settings.max_pixels
        )
        allowed = list(index.roots)
        if settings.upload_dir is not None:
            allowed.append(str(settings.upload_dir))
        self._static_roots = [os.path.realpath(r) for r in allowed]

    def allowed_roots(self) -> list[str]:
        """Folders files may be served from: the indexed roots (re-read: sync may add some)."""
        roots = {os.path.realpath(r) for r in self.index.roots}
        return sorted(roots.union(self._static_roots))

    async def run(
        self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self.model_pool.shutdown(wait=True, cancel_futures=True)
        self.lookup_pool.shutdown(wait=True, cancel_futures=True)
        self.write_pool.shutdown(wait=True)

    # -- catalogue look-ups --------------------------------------------------------------------
    def record_or_404(self, image_id: int) -> Any:
        rec = self.index.get(image_id)
        if rec is None:
            raise ApiError(404, "image_not_found", f"no image with id {image_id} in the catalogue")
        if getattr(rec, "status", "ok") != "ok":
            raise ApiError(404, "image_not_indexed", f"image {image_id} could not be indexed")
        return rec

    def catalogue_file(self, image_id: int) -> str:
        """The file of catalogue entry ``image_id``, only if it still lies under an allowed root.

        The path comes from the catalogue, never from the request; the root check also
        stops a symlink planted in a collection from exposing files outside it.
        """
        rec = self.record_or_404(image_id)
        real = os.path.realpath(rec.path)
        inside = any(
            real == root or real.startswith(root.rstrip(os.sep) + os.sep)
            for root in self.allowed_roots()
        )
        if not inside:
            log.warning("refused to serve id %d: %s is outside the indexed roots", image_id, real)
            raise ApiError(404, "image_not_found", f"image {image_id} is not available")
        if not os.path.isfile(real):
            raise ApiError(
                404, "image_missing", f"the file of image {image_id} is no longer on disk"
            )
        return real

    def display_path(self, path: str) -> str:
        """Path relative to its indexed root: clients never learn the server's folder layout."""
        try:
            rel = self.index.relative_path(path)
        except Exception:
            rel = None
        if not rel or os.path.isabs(rel) or rel.startswith(".."):
            if self.settings.upload_dir is not None:
                up = os.path.realpath(self.settings.upload_dir)
                real = os.path.realpath(path)
                if real.startswith(up + os.sep):
                    return "uploads/" + os.path.relpath(real, up).replace(os.sep, "/")
            return os.path.basename(path)
        return rel.replace(os.sep, "/")


def _check_upload(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Format, width and height of an upload, from its bytes and header only.

    415 when the bytes are not an accepted image format (whatever the name or declared
    type), 422 when the header is unreadable or declares more than ``max_pixels``
    (a decompression bomb is refused before a single pixel is decoded).
    """
    if not data:
        raise ApiError(422, "empty_upload", "the uploaded file is empty")
    fmt = sniff_image_format(data)
    if fmt is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            "the upload is not an image in a supported format "
            "(JPEG, PNG, GIF, BMP, WebP, TIFF, PPM)",
        )
    try:
        width, height = image_size(data)
    except DecodeError as exc:
        raise ApiError(422, "undecodable_image", f"the {fmt} image cannot be read") from exc
    if width * height > max_pixels:
        raise ApiError(
            422,
            "too_many_pixels",
            f"image too large: {width}x{height} = {width * height:,} pixels "
            f"exceeds the limit of {max_pixels:,}",
        )
    return fmt, width, height


def _decode_upload(data: bytes, max_pixels: int, index: Index) -> str:
    """Check and fully decode an upload before it is stored (422 if it will not decode)."""
    fmt, _, _ = _check_upload(data, max_pixels)
    try:
        load_image(
            data, max_pixels=max_pixels, target_size=index.descriptor.preprocess.resized_size
        )
    except DecodeError as exc:
        raise ApiError(
            422, "undecodable_image", f"the {fmt} image cannot be decoded: {exc.reason}"
        ) from exc
    return fmt


def create_app(index: Index, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``index``.

    The caller owns ``index`` (opens and closes it). Raises
    :class:`cbir.serve.security.ServeConfigError` for unsafe settings, e.g. write
    endpoints without a token.
    """
    settings = settings or ServeSettings()
    settings.validate()
    server = _Server(index, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's own protocol
        refresher = None
        if settings.refresh_seconds > 0:
            refresher = asyncio.create_task(_refresh_loop(server, settings.refresh_seconds))
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            server.shutdown()

    app = FastAPI(
        title="cbir image search",
        summary="Content-based image retrieval over an indexed collection.",
        version=_version(),
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.server = server

    # -- errors: one JSON shape, no tracebacks ---------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None)
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), code),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return JSONResponse(
            error_body(422, "; ".join(parts) or "invalid request", "invalid_request"), 422
        )

    @app.exception_handler(IndexError_)
    async def index_error(request: Request, exc: IndexError_) -> JSONResponse:
        status, code = _index_error_status(exc)
        if status >= 500:
            log.warning("index error: %s", exc)
        return JSONResponse(error_body(status, str(exc), code), status)

    # -- auth -------------------------------------------------------------------------------------
    def require_writer(request: Request) -> None:
        if not settings.writes:
            raise ApiError(
                403,
                "writes_disabled",
                "this server is read-only; start it with --token-file to enable writes",
            )
        given = bearer_token(request.headers.get("authorization"))
        if given is None:
            raise ApiError(
                401,
                "missing_token",
                "this endpoint needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        assert settings.token is not None  # validate() guarantees it when writes are on
        if not token_matches(given, settings.token):
            raise ApiError(
                401,
                "invalid_token",
                "the bearer token is not valid",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    writer_only = [Depends(require_writer)]

    def lookup(fn: Callable[[], T]) -> Awaitable[T]:
        return server.run(server.lookup_pool, fn)

    # -- pages ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- read endpoints ---------------------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse, summary="Liveness and collection size")
    async def health() -> dict[str, Any]:
        stats = await lookup(index.stats)
        return {"status": "ok", "images": int(stats.get("images", 0))}

    @app.get("/stats", summary="Collection size, descriptor, index type and server limits")
    async def stats() -> dict[str, Any]:
        raw = await lookup(index.stats)
        # Whitelist: the index's stats also hold absolute paths (roots) that clients need not see.
        public = {
            k: raw[k]
            for k in ("images", "failures", "descriptor", "identity", "index", "dim")
            if k in raw
        }
        public["roots"] = len(raw.get("roots", index.roots))
        public["server"] = {
            "writes": settings.writes,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "max_k": settings.max_k,
            "max_qe": settings.max_qe,
            "search_threads": settings.search_threads,
            "thumbnails": server.thumbnails.stats(),
        }
        return public

    @app.post(
        "/search",
        response_model=SearchResponse,
        summary="Find the images most similar to a query",
        description="Give either `image` (an uploaded file) or `id` (an indexed image). "
        "`qe` > 0 turns on alpha-query-expansion (Radenovic et al. 2018) "
        "with that many neighbours.",
    )
    async def search(
        request: Request,
        image: Annotated[
            UploadFile | None,
            File(description="Query image (JPEG, PNG, GIF, BMP, WebP, TIFF, PPM)."),
        ] = None,
        id: Annotated[
            int | None, Form(description="Id of an indexed image to use as the query.")
        ] = None,
        k: Annotated[int, Form(ge=1, description="Number of results.")] = 20,
        qe: Annotated[int, Form(ge=0, description="Query-expansion neighbours (0: off).")] = 0,
        alpha: Annotated[float, Form(ge=0, le=100, description="alpha-QE weight exponent.")] = 3.0,
        exclude_self: Annotated[
            bool, Form(description="Leave the query image out of the results.")
        ] = False,
    ) -> dict[str, Any]:
        if k > settings.max_k:
            raise ApiError(422, "k_too_large", f"k must be at most {settings.max_k}")
        if qe > settings.max_qe:
            raise ApiError(422, "qe_too_large", f"qe must be at most {settings.max_qe}")
        if (image is None) == (id is None):
            raise ApiError(422, "bad_query", "give exactly one of 'image' (a file upload) or 'id'")
        start = time.perf_counter()
        query_info: dict[str, Any]
        if image is not None:
            data = await image.read()

            def run_upload() -> tuple[list[Any], dict[str, Any]]:
                fmt, width, height = _check_upload(data, settings.max_pixels)
                try:
                    # The bytes go to the index, which decodes them exactly as it decoded
                    # the collection (JPEG draft mode included): an indexed file uploaded
                    # again gets its own vector back, similarity 1.
                    hits = index.search(data, k=k, qe=qe, alpha=alpha, exclude_self=exclude_self)
                except QueryError as exc:
                    raise ApiError(
                        422, "undecodable_image", f"the {fmt} image cannot be decoded: {exc}"
                    ) from exc
                return hits, {"type": "upload", "format": fmt, "width": width, "height": height}

            hits, query_info = await server.run(server.model_pool, run_upload)
        else:
            assert id is not None

            def run_id() -> list[Any]:
                rec = server.record_or_404(id)
                return index.search(rec.path, k=k, qe=qe, alpha=alpha, exclude_self=exclude_self)

            hits = await lookup(run_id)
            query_info = {"type": "id", "id": id}
        root = request.scope.get("root_path", "")
        results = [
            {
                "id": int(h.id),
                "path": server.display_path(h.path),
                "score": float(h.score),
                "thumbnail": f"{root}/thumbnails/{int(h.id)}",
                "image": f"{root}/images/{int(h.id)}",
            }
            for h in hits
        ]
        took = (time.perf_counter() - start) * 1000
        return {
            "query": query_info,
            "k": k,
            "count": len(results),
            "took_ms": round(took, 2),
            "results": results,
        }

    @app.get(
        "/images/{image_id}",
        summary="The original file of an indexed image",
        responses={
            200: {"content": {"image/jpeg": {}}},
            404: {"description": "Not in the catalogue"},
        },
    )
    async def get_image(image_id: int) -> FileResponse:
        path = await lookup(lambda: server.catalogue_file(image_id))
        fmt = sniff_file_format(path)
        if fmt is None:
            raise ApiError(
                404, "image_missing", f"the file of image {image_id} is no longer an image"
            )
        return FileResponse(
            path,
            media_type=MIME_TYPES[fmt],
            filename=os.path.basename(path),
            content_disposition_type="inline",
            headers={"Cache-Control": "private, max-age=300"},
        )

    @app.get(
        "/thumbnails/{image_id}",
        summary="A JPEG thumbnail of an indexed image (cached)",
        responses={
            200: {"content": {"image/jpeg": {}}},
            304: {"description": "Not modified"},
            404: {"description": "Not in the catalogue"},
        },
    )
    async def get_thumbnail(image_id: int, request: Request) -> Response:
        def make() -> Any:
            path = server.catalogue_file(image_id)
            try:
                return server.thumbnails.get(image_id, path)
            except (DecodeError, OSError) as exc:
                log.warning("thumbnail of id %d failed: %s", image_id, exc)
                raise ApiError(
                    404, "image_unreadable", f"image {image_id} cannot be decoded"
                ) from exc

        thumb = await lookup(make)
        headers = {"ETag": thumb.etag, "Cache-Control": "private, max-age=300"}
        if request.headers.get("if-none-match") == thumb.etag:
            return Response(status_code=304, headers=headers)
        return Response(thumb.data, media_type=thumb.media_type, headers=headers)

    # -- write endpoints --------------------------------------------------------------------------
    @app.post(
        "/images",
        status_code=201,
        dependencies=writer_only,
        response_model=AddResponse,
        summary="Add an image (needs the token)",
        responses={
            200: {"description": "Already indexed"},
            401: {"description": "Missing or wrong token"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {
                                    "type": "string",
                                    "format": "binary",
                                    "description": "Image to store and index.",
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def add_image(request: Request) -> JSONResponse:
        # The form is parsed here, after the token check, so unauthenticated clients
        # cannot make the server receive and spool an upload first.
        try:
            form = await request.form(max_files=1, max_fields=4)
        except StarletteHTTPException:
            raise
        except Exception as exc:
            raise ApiError(
                400, "bad_form", "expected a multipart/form-data body with an 'image' file"
            ) from exc
        upload = form.get("image")
        if not isinstance(upload, StarletteUploadFile):
            raise ApiError(422, "bad_query", "the form needs an 'image' file field")
        data = await upload.read()
        assert settings.upload_dir is not None
        upload_dir = settings.upload_dir

        def store_and_add() -> tuple[int, str, bool]:
            fmt = _decode_upload(data, settings.max_pixels, index)
            # Content-addressed name: the client's file name never reaches the file system.
            name = hashlib.sha256(data).hexdigest()[:32] + SUFFIXES[fmt]
            path = upload_dir / name
            if not path.exists():
                upload_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            # workers=0: decode in this thread; forking decode workers per upload would
            # cost more than the single image they describe.
            report = index.add([path], progress=False, workers=0)
            image_id = _id_of(index, path)
            if image_id is None:
                reason = "; ".join(
                    str(getattr(f, "reason", f)) for f in getattr(report, "failures", [])[:1]
                )
                raise ApiError(
                    422,
                    "not_indexed",
                    f"the image could not be indexed: {reason or 'unknown reason'}",
                )
            changed = report.added + report.updated + report.moved
            return image_id, str(path), changed > 0

        image_id, path, added = await server.run(server.write_pool, store_and_add)
        body = {"id": image_id, "path": server.display_path(path), "added": added}
        return JSONResponse(body, status_code=201 if added else 200)

    @app.delete(
        "/images/{image_id}",
        response_model=RemoveResponse,
        summary="Remove an image (needs the token)",
        dependencies=writer_only,
        responses={
            401: {"description": "Missing or wrong token"},
            404: {"description": "Not in the catalogue"},
        },
    )
    async def remove_image(image_id: int) -> dict[str, int]:
        def remove() -> int:
            rec = index.get(image_id)
            if rec is None:
                raise ApiError(
                    404, "image_not_found", f"no image with id {image_id} in the catalogue"
                )
            removed = index.remove([image_id])
            if not removed:
                raise ApiError(
                    404, "image_not_found", f"no image with id {image_id} in the catalogue"
                )
            _delete_if_uploaded(rec.path, upload_dir=settings.upload_dir)
            return int(removed)

        await server.run(server.write_pool, remove)
        return {"removed": image_id}

    # Innermost first: Starlette's limiter counts body bytes as they arrive (413 without
    # spooling an oversized upload); our middleware answers a declared oversize
    # Content-Length at once, in the API's JSON error shape, and logs every request.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_upload_bytes)
    app.add_middleware(
        RequestLogAndHeaders, enabled=settings.log_requests, max_body=settings.max_upload_bytes
    )
    return app


async def _refresh_loop(server: _Server, every: float) -> None:
    """Pick up what other processes commit (``cbir index`` run while serving).

    ``Index.refresh`` compares one generation counter and reloads only on a change;
    it runs on the writer thread so it never races the server's own writes.
    """
    while True:
        await asyncio.sleep(every)
        try:
            if await server.run(server.write_pool, server.index.refresh):
                log.info("index changed on disk: reloaded")
        except Exception as exc:  # a failed refresh must not stop the loop
            log.warning("index refresh failed: %s", exc)


def _index_error_status(exc: IndexError_) -> tuple[int, str]:
    """HTTP status and code for the index's own errors (their messages are user-facing)."""
    if isinstance(exc, QueryError):
        return 422, "bad_query"
    if isinstance(exc, DescriptorMismatchError):
        return 422, "descriptor_mismatch"
    if isinstance(exc, (IndexBusyError, IndexNotTrainedError)):
        return 503, "index_unavailable"
    return 500, "index_error"


def _id_of(index: Index, path: Path) -> int | None:
    """Catalogue id of a successfully indexed file, or None if it failed or is absent."""
    record = index.lookup(path)
    if record is None or record.status != "ok":
        return None
    return int(record.id)


def _delete_if_uploaded(path: str, upload_dir: Path | None) -> None:
    """Remove a file the server itself stored (never a file of an indexed collection)."""
    if upload_dir is None:
        return
    real = os.path.realpath(path)
    if os.path.dirname(real) == os.path.realpath(upload_dir):
        try:
            os.unlink(real)
        except OSError as exc:
            log.warning("could not delete uploaded file %s: %s", real, exc)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cbir")
    except Exception:
        return "0"
