"""Uploaded images: checked from their first bytes and header, stored only under the lock.

An upload is refused before it costs anything: its format comes from its bytes (415
for anything that is not an accepted image, whatever its name), and its declared size
and decode memory are judged from its header (422) before a model thread decodes a
pixel. A file is written to the upload folder only while this process holds the index's
writer lock, so an upload refused because ``cbir index`` is running (503) leaves nothing
behind, and one that fails to index is removed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from cbir.data.decode import DecodeError, ImageHeader, TargetSize, check_image
from cbir.fileio import atomic_write_bytes
from cbir.index import Index
from cbir.serve.errors import ApiError
from cbir.serve.security import SUFFIXES, sniff_image_format
from cbir.serve.settings import ServeSettings

log = logging.getLogger("cbir.serve")

_ACCEPTED = "JPEG, PNG, GIF, BMP, WebP, TIFF, PPM, HEIC, AVIF"


def check_upload(
    data: bytes, settings: ServeSettings, target_size: TargetSize | None
) -> tuple[str, ImageHeader]:
    """Format (sniffed from the bytes) and header of an upload, refused (415/422) before
    any pixel is decoded.

    ``target_size`` is the model's input size, so the memory estimate counts JPEG draft
    decoding and the shrinking of 16-bit images exactly as the decode will.
    """
    if not data:
        raise ApiError(422, "empty_upload", "the uploaded file is empty")
    fmt = sniff_image_format(data)
    if fmt is None:
        raise ApiError(
            415, "unsupported_media_type", f"the upload is not an image in a supported format ({_ACCEPTED})"
        )
    try:
        return fmt, check_image(
            data,
            max_pixels=settings.max_pixels,
            max_decode_bytes=settings.max_decode_bytes,
            target_size=target_size,
        )
    except DecodeError as exc:
        # the codes say which limit (too_many_pixels, decode_memory_limit) or undecodable_image
        raise ApiError(exc.http_status, exc.code, f"the {fmt} image cannot be used: {exc.reason}") from exc


def upload_path(data: bytes, fmt: str, upload_dir: Path) -> Path:
    """Content-addressed file name: the client's file name never reaches the file system."""
    return upload_dir / (hashlib.sha256(data).hexdigest()[:32] + SUFFIXES[fmt])


def store_and_add(index: Index, data: bytes, fmt: str, upload_dir: Path) -> tuple[int, str, bool]:
    """Write the upload and index it, under the index's writer lock; (id, path, added).

    ``Index.writer(wait=0)`` raises at once when another process (``cbir index``)
    writes, before the file exists; ``index.add`` re-enters the lock this thread holds.
    """
    path = upload_path(data, fmt, upload_dir)
    with index.writer(wait=0):
        written = not path.exists()
        if written:
            upload_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        try:
            # workers=0: decode in this thread; forking decode workers per upload would
            # cost more than the single image they describe.
            report = index.add([path], progress=False, workers=0)
        except BaseException:
            if written:
                _unlink(path)
            raise
        record = index.lookup(path)
        if record is None or record.status != "ok":
            reason = report.failures[0].reason if report.failures else "unknown reason"
            index.remove([path])
            if written:
                _unlink(path)
            raise ApiError(422, "not_indexed", f"the image could not be indexed: {reason}")
    changed = report.added + report.updated + report.moved
    return int(record.id), str(path), changed > 0


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not delete uploaded file %s: %s", path, exc)


def delete_upload(path: str | os.PathLike) -> None:
    """Remove a file the server stored itself, after its catalogue entry is gone."""
    _unlink(path)
