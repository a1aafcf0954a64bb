"""Run the app with uvicorn: open the index once, size the threads, log, serve.

This is what ``cbir serve`` calls; it is separate from :func:`create_app` so that
tests and other ASGI servers (gunicorn with uvicorn workers, hypercorn) can use the
app without any of the process-wide set-up done here.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

from cbir.serve.protocol import ConnectionLimits, limited_protocol
from cbir.serve.security import (
    ServeConfigError,
    is_loopback,
    read_token_file,
    token_file_is_private,
    write_new_token,
)
from cbir.serve.settings import ServeSettings, machine_threads

log = logging.getLogger("cbir.serve")

#: Name of the token file generated for a loopback server started with writes but no token.
GENERATED_TOKEN_FILE = "serve.token"


@dataclass
class TokenSetup:
    """The token the server will use, where it came from, and any warning to show."""

    token: str | None
    path: Path | None
    generated: bool = False
    warning: str | None = None


def resolve_token(
    db: Path, host: str, token_file: Path | None, writes: bool | None
) -> tuple[bool, TokenSetup]:
    """Decide whether writes are on and which token guards them.

    * ``--token-file F``: writes on (unless ``--read-only``), token read from F.
    * ``--writes`` without a token file: on a loopback host a random token is written
      to ``<db>/serve.token`` (owner-only), like Jupyter's; elsewhere this is refused,
      because a token nobody chose would then protect a public endpoint.
    * neither: read-only.
    """
    if token_file is not None:
        token = read_token_file(token_file)
        warning = None
        if not token_file_is_private(token_file):
            warning = f"token file {token_file} is readable by other users (chmod 600 it)"
        return (True if writes is None else writes), TokenSetup(token, token_file, warning=warning)
    if not writes:
        return False, TokenSetup(None, None)
    if not is_loopback(host):
        raise ServeConfigError(
            f"refusing to start: write endpoints on {host} (not a loopback address) need "
            "--token-file FILE; or serve read-only"
        )
    path = db / GENERATED_TOKEN_FILE
    if path.is_file():
        return True, TokenSetup(read_token_file(path), path)
    return True, TokenSetup(write_new_token(path), path, generated=True)


def configure_threads(search_threads: int) -> int:
    """Split the cores between concurrent searches: intra-op threads per search.

    N searches each running a model with all cores' worth of threads would
    oversubscribe the CPU N times over; giving each search cores/N threads keeps the
    machine busy without thrashing. Returns the per-search thread count.
    """
    per_search = max(1, machine_threads() // max(1, search_threads))
    import torch

    torch.set_num_threads(per_search)
    try:
        import faiss

        faiss.omp_set_num_threads(per_search)
    except (ImportError, AttributeError):
        pass
    return per_search


def configure_logging(level: str) -> None:
    """Timestamped request/server log lines on stderr (journald and docker keep them)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_server(
    db: str | os.PathLike, settings: ServeSettings, *, root_path: str = "", log_level: str = "info"
) -> None:
    """Serve the index folder ``db`` until interrupted (blocking)."""
    import uvicorn

    from cbir.api import open_index
    from cbir.serve.app import create_app

    configure_logging(log_level)
    settings.validate()
    per_search = configure_threads(settings.search_threads)
    index = open_index(db, readonly=not settings.writes)  # the facade: never creates an index
    try:
        app = create_app(index, settings)
        stats = index.stats()
        log.info(
            "serving %s (%d images, %s) on http://%s:%d%s/ with %d search threads x %d; writes %s",
            db,
            stats.get("images", 0),
            stats.get("descriptor"),
            settings.host,
            settings.port,
            root_path,
            settings.search_threads,
            per_search,
            "on" if settings.writes else "off",
        )
        config = uvicorn_config(app, settings, root_path=root_path, log_level=log_level)
        uvicorn.Server(config).run()
    finally:
        index.close()


def uvicorn_config(
    app: FastAPI, settings: ServeSettings, *, root_path: str = "", log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn's configuration for ``app``, with the server's connection limits.

    Header and body deadlines and the connection cap come from
    :class:`cbir.serve.protocol.LimitedH11Protocol` (uvicorn has no header or body
    timeout); the idle keep-alive timeout, the cap on concurrent requests and the
    largest request head are uvicorn's own options.
    """
    import uvicorn

    limits = ConnectionLimits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        body_min_rate=settings.body_min_rate,
        max_connections=settings.max_connections,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        root_path=root_path,
        log_level=log_level,
        http=limited_protocol(limits),
        timeout_keep_alive=settings.keepalive_timeout,
        limit_concurrency=settings.max_connections + 1,  # uvicorn counts the asking connection too
        h11_max_incomplete_event_size=settings.max_header_bytes,
        access_log=False,  # the app logs each request itself (with request ids)
        server_header=False,
        proxy_headers=True,  # X-Forwarded-For from FORWARDED_ALLOW_IPS (default: loopback)
        log_config=None,
    )
