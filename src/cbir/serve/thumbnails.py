"""Thumbnails for result grids: made once per image version, kept in a bounded memory cache.

A results page shows 20-100 thumbnails, and the same popular images come back in
many result lists, so decoding a 12-megapixel original for each one would dominate
the server's work. Thumbnails are keyed by the image's id *and* its file's size and
modification time, so a file changed on disk gets a new thumbnail without any
invalidation protocol, and the cache holds at most ``max_bytes`` of JPEG data
(least recently used first out).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cbir.data.decode import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, load_image

#: Longest side of a thumbnail in pixels (the page's grid cells are ~180 CSS px wide).
DEFAULT_THUMBNAIL_SIZE = 256
#: Memory the cache may hold: ~2,500 thumbnails of ~12 KB.
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024
_JPEG_QUALITY = 85


@dataclass(frozen=True)
class Thumbnail:
    """Encoded JPEG bytes and a strong validator for HTTP caching."""

    data: bytes
    etag: str
    media_type: str = "image/jpeg"


def make_thumbnail(
    path: str | os.PathLike,
    size: int,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
) -> bytes:
    """Decode ``path`` (JPEG draft mode near ``size``); encode a JPEG with longest side ``size``."""

    def target(w: int, h: int) -> tuple[int, int]:
        scale = min(1.0, size / max(w, h))
        return max(1, round(w * scale)), max(1, round(h * scale))

    img = load_image(path, max_pixels=max_pixels, target_size=target, max_decode_bytes=max_decode_bytes)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
    return buf.getvalue()


class ThumbnailCache:
    """Thread-safe LRU of :class:`Thumbnail` bounded by total bytes."""

    def __init__(
        self,
        size: int = DEFAULT_THUMBNAIL_SIZE,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
    ) -> None:
        if size < 16:
            raise ValueError("thumbnail size must be at least 16 pixels")
        self.size = size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self._items: OrderedDict[tuple, Thumbnail] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, image_id: int, path: str | os.PathLike) -> Thumbnail:
        """The thumbnail of ``path`` (id ``image_id``); raises ``OSError`` or ``DecodeError``."""
        st = os.stat(path)
        key = (image_id, os.fspath(path), st.st_size, st.st_mtime_ns, self.size)
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return item
            self.misses += 1
        data = make_thumbnail(path, self.size, self.max_pixels, self.max_decode_bytes)
        etag = '"' + hashlib.sha256(repr(key).encode() + data).hexdigest()[:24] + '"'
        item = Thumbnail(data, etag)
        with self._lock:
            if key not in self._items and len(data) <= self.max_bytes:
                self._items[key] = item
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= len(old.data)
        return item

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "items": len(self._items),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
