"""What every request needs, and the FastAPI dependencies that hand it out.

The index is opened once, before the app exists (the descriptor model lives in it), and
:class:`ServerState` holds it with the settings, the thread lanes and the thumbnail cache.
Endpoints ask for it with ``state: State`` (one dependency) instead of closing over
variables of ``create_app``, so each router is a plain module.

Lanes, each for a reason: image queries (decode + model, tens of milliseconds) and
look-ups (search by a stored vector, thumbnails, stats: about a millisecond of FAISS or
SQLite) get separate pools sized to the machine, so a click on a result never waits
behind queued uploads; writes run on one thread of their own, serialised, and never take
a search thread (the index's locking keeps searches consistent meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, Path, Request

from cbir.index import ImageRecord, Index, IndexBusyError
from cbir.serve.errors import ApiError
from cbir.serve.paths import PathPolicy
from cbir.serve.security import bearer_token, token_matches
from cbir.serve.settings import ServeSettings
from cbir.serve.thumbnails import ThumbnailCache

log = logging.getLogger("cbir.serve")
T = TypeVar("T")

#: Largest catalogue id: SQLite's INTEGER PRIMARY KEY is a signed 64-bit integer, and a
#: larger one would overflow in the driver (a 500) instead of being a client error (a 422).
MAX_ID = 2**63 - 1

#: A catalogue id in a URL path, validated before any look-up.
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="Catalogue id of an indexed image.")]


class ServerState:
    """The index, the settings, the thread lanes, the thumbnail cache and the path rules."""

    def __init__(self, index: Index, settings: ServeSettings) -> None:
        self.index = index
        self.settings = settings
        self.model_pool = ThreadPoolExecutor(settings.search_threads, thread_name_prefix="cbir-model")
        self.lookup_pool = ThreadPoolExecutor(settings.search_threads, thread_name_prefix="cbir-lookup")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="cbir-write")
        self.thumbnails = ThumbnailCache(
            settings.thumbnail_size,
            settings.thumbnail_cache_bytes,
            settings.max_pixels,
            settings.max_decode_bytes,
        )
        self.paths = PathPolicy(lambda: index.roots, settings.upload_dir)
        self._ids_generation: int | None = None
        self._ids = np.empty(0, dtype=np.int64)
        self._ids_lock = threading.Lock()

    async def run(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on ``pool``, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))

    async def lookup(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the look-up lane (cheap catalogue and FAISS work)."""
        return await self.run(self.lookup_pool, fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the single writer thread.

        Another process writing the index keeps the index's status and code, with a
        message for HTTP clients (the index's own names its folder and a CLI option).
        """
        try:
            return await self.run(self.write_pool, fn, *args)
        except IndexBusyError as exc:
            message = "another process (e.g. 'cbir index') is writing to the index: try again when it has finished"
            raise ApiError(exc.http_status, exc.code, message) from exc

    def shutdown(self) -> None:
        self.model_pool.shutdown(wait=True, cancel_futures=True)
        self.lookup_pool.shutdown(wait=True, cancel_futures=True)
        self.write_pool.shutdown(wait=True)

    # -- catalogue look-ups (run on a lane: they query SQLite) ---------------------------------
    def record(self, image_id: int) -> ImageRecord:
        """The indexed record of ``image_id``; 404 when absent or not indexed."""
        rec = self.index.get(image_id)
        if rec is None:
            raise ApiError(404, "image_not_found", f"no image with id {image_id} in the catalogue")
        if rec.status != "ok":
            raise ApiError(404, "image_not_indexed", f"image {image_id} could not be indexed")
        return rec

    def catalogue_file(self, image_id: int) -> tuple[ImageRecord, str]:
        """The record and real file of ``image_id``, only if it may be served.

        The path comes from the catalogue, never from the request, and must still lie
        under an indexed root or the upload folder (see :class:`PathPolicy`).
        """
        rec = self.record(image_id)
        if not self.paths.servable(rec.path):
            log.warning("refused to serve id %d: %s is outside the indexed roots", image_id, rec.path)
            raise ApiError(404, "image_not_found", f"image {image_id} is not available")
        real = os.path.realpath(rec.path)
        if not os.path.isfile(real):
            raise ApiError(404, "image_missing", f"the file of image {image_id} is no longer on disk")
        return rec, real

    def collection_ids(self) -> np.ndarray:
        """The ids of the indexed images, ascending, re-read only when the index changes.

        A page of ``GET /images`` is then a slice of this array and one look-up of its
        paths, whatever the collection's size: the catalogue is read in full (ids only,
        8 bytes an image) once per committed change, not once per page.
        """
        generation = self.index.catalog.generation
        with self._ids_lock:
            if generation != self._ids_generation:
                self._ids = self.index.catalog.ok_ids()
                self._ids_generation = generation
            return self._ids

    def urls(self, request: Request, image_id: int) -> dict[str, str]:
        """Thumbnail and original URLs of an image (prefixed by the proxy's root path)."""
        root = request.scope.get("root_path", "")
        return {"thumbnail": f"{root}/thumbnails/{image_id}", "image": f"{root}/images/{image_id}"}


def get_state(request: Request) -> ServerState:
    """The dependency every endpoint uses to reach the index and the settings."""
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


def require_writer(request: Request, state: State) -> None:
    """Dependency of the write endpoints: writes on, and the right bearer token.

    Runs before the body is read, so an unauthenticated client cannot make the server
    receive and spool an upload first.
    """
    settings = state.settings
    if not settings.writes:
        raise ApiError(
            403, "writes_disabled", "this server is read-only; start it with --token-file to enable writes"
        )
    given = bearer_token(request.headers.get("authorization"))
    if given is None:
        raise ApiError(
            401,
            "missing_token",
            "this endpoint needs 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    assert settings.token is not None  # ServeSettings.validate() guarantees it when writes are on
    if not token_matches(given, settings.token):
        raise ApiError(
            401,
            "invalid_token",
            "the bearer token is not valid",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
