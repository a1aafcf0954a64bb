"""Crash-safe file writes: write to a temporary name, fsync, rename, fsync the folder.

A reader (or the next run after a kill -9) sees either the old file or the new one,
never a half-written one. Every file the package writes for later use goes through here.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux's
    /proc/self/status); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _replaced_on_success(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """A temporary file beside ``path`` (open descriptor, name) that replaces ``path`` when
    the block ends normally and is deleted when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a written file gets the mode open() would give it (0666 less the
        # umask), so an index made by one user can be read by the service user of a server
        os.fchmod(fd, 0o666 & ~current_umask())
        yield fd, tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically."""
    with _replaced_on_success(path) as (fd, _), os.fdopen(fd, mode) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_by_name(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let ``write`` create the file itself, given a temporary path beside ``path`` (for
    writers that want a file name, like ``faiss.write_index``), then fsync and rename.

    It saves the in-memory copies of ``atomic_write_bytes`` (a serialised FAISS index of
    100,000 vectors of 1280 floats is 512 MB, and a bytes copy of it another 512 MB).
    """
    with _replaced_on_success(path) as (fd, tmp):
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable by syncing the folder entry (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path: str | os.PathLike, writer: Callable[[IO[bytes]], None]) -> None:
    """Let ``writer`` stream into the file (``np.save``, ``torch.save``, ...), atomically."""
    buf = io.BytesIO()
    writer(buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    atomic_save(path, lambda fh: torch.save(obj, fh))


def atomic_numpy_save(path: str | os.PathLike, array: Any) -> None:
    import numpy as np

    atomic_save(path, lambda fh: np.save(fh, array, allow_pickle=False))
