"""Server settings, and the start-up checks that refuse unsafe combinations."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbir.serve.security import ServeConfigError, is_loopback
from cbir.serve.thumbnails import DEFAULT_CACHE_BYTES, DEFAULT_THUMBNAIL_SIZE

#: Largest accepted request body (an upload): a 20 MB phone photo fits, a video does not.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Decompression-bomb limit for uploads: width x height of a ~50-megapixel camera.
DEFAULT_UPLOAD_MAX_PIXELS = 50_000_000
#: Most results one search may ask for (a grid page; a client needing more is scraping).
DEFAULT_MAX_K = 100
#: Most query-expansion neighbours (alpha-QE, Radenovic et al. 2018, uses a handful).
DEFAULT_MAX_QE = 50
#: Memory one decode may take (bitmap + conversion), judged from the header: a 50 Mpx RGB
#: PNG (200 MB) fits, a 50 Mpx RGBA PNG (about 1 GB with its compositing on white) does not.
#: Concurrent decodes are at most --threads, so this bounds their memory together too.
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
#: Seconds a client has to send a request's headers, from its first byte (or from
#: connecting): slowloris clients, which trickle header lines to hold connections open,
#: are cut off here. uvicorn has no such limit.
DEFAULT_HEADER_TIMEOUT = 10.0
#: Seconds a request body may take, extended by one second per DEFAULT_BODY_MIN_RATE bytes
#: received (Apache mod_reqtimeout's scheme): a slow but steady upload finishes, a
#: trickle of a few bytes a second does not.
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_BODY_MIN_RATE = 32 * 1024
#: Seconds an idle keep-alive connection stays open (uvicorn's own option).
DEFAULT_KEEPALIVE_TIMEOUT = 5
#: Most open connections; more are answered 503 and closed at once. Worst-case request
#: memory is about this times --max-upload-mb (bodies being received), plus --threads times
#: the decode ceiling.
DEFAULT_MAX_CONNECTIONS = 256
#: Largest request head (request line + headers), uvicorn's h11 default made explicit.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024


def machine_threads() -> int:
    """CPU cores this process may use (respects affinity masks and container cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class ServeSettings:
    """Everything :func:`cbir.serve.create_app` needs besides the index.

    ``writes`` turns on ``POST /images`` and ``DELETE /images/{id}``; they always need
    ``token`` (sent as ``Authorization: Bearer <token>``), and uploaded files are
    stored in ``upload_dir`` under names derived from their content.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    writes: bool = False
    upload_dir: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_UPLOAD_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    max_k: int = DEFAULT_MAX_K
    max_qe: int = DEFAULT_MAX_QE
    search_threads: int = 0  # 0: one per core
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE
    thumbnail_cache_bytes: int = DEFAULT_CACHE_BYTES
    log_requests: bool = True
    refresh_seconds: float = 5.0  # poll for changes committed by other processes; 0: never
    # connection limits, applied by cbir.serve.server (uvicorn), not by the ASGI app
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    body_min_rate: int = DEFAULT_BODY_MIN_RATE
    keepalive_timeout: int = DEFAULT_KEEPALIVE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.search_threads <= 0:
            self.search_threads = machine_threads()
        if self.upload_dir is not None:
            self.upload_dir = Path(self.upload_dir)

    def validate(self) -> None:
        """Raise :class:`ServeConfigError` for a configuration the server must not run with."""
        limits = (self.max_upload_bytes, self.max_pixels, self.max_decode_bytes, self.max_k)
        timeouts = (self.header_timeout, self.body_timeout, self.body_min_rate, self.keepalive_timeout)
        if min(limits) <= 0 or self.max_qe < 0 or min(timeouts) <= 0 or self.max_connections <= 0:
            raise ServeConfigError("limits and timeouts must be positive")
        if not self.writes:
            return
        if self.token is None:
            if not is_loopback(self.host):
                raise ServeConfigError(
                    f"refusing to start: write endpoints on {self.host} (not a loopback address) "
                    "need a token; pass --token-file FILE or serve read-only (--read-only)"
                )
            raise ServeConfigError("write endpoints need a token (pass --token-file FILE)")
        if self.upload_dir is None:
            raise ServeConfigError("write endpoints need an upload folder (upload_dir)")
