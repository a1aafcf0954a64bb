"""Which files the server may send, and how their paths look to clients.

Two rules, kept in one place because every endpoint that names a file needs both:

* a file is served only when its real path (symlinks resolved) lies under an indexed
  root or the upload folder, so a symlink planted in a collection cannot expose
  ``/etc/passwd``;
* a path in a response is relative to the indexed root it lies under, and an uploaded
  file's is ``uploads/<name>``, whatever the server's working directory or the way
  ``--db`` was spelled: clients never learn the server's folder layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

#: Prefix of uploaded files' public paths (they lie outside every indexed root).
UPLOADS_PREFIX = "uploads"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class PathPolicy:
    """Public paths and the serving check for the files of one index.

    ``roots`` is called on every use, because a ``cbir index`` run in another process
    may add roots while the server runs.
    """

    def __init__(self, roots: Callable[[], Iterable[str]], upload_dir: Path | None) -> None:
        self._roots = roots
        self._upload_dir = os.path.abspath(upload_dir) if upload_dir is not None else None

    def _bases(self) -> list[tuple[str, str]]:
        """(absolute folder, public prefix) pairs, the upload folder included."""
        bases = [(os.path.abspath(r), "") for r in self._roots()]
        if self._upload_dir is not None:
            bases.append((self._upload_dir, UPLOADS_PREFIX))
        return bases

    def public(self, path: str | os.PathLike) -> str:
        """``path`` as clients see it: relative to the innermost root holding it (the file
        name alone if none does), with ``/`` separators."""
        absolute = os.path.abspath(path)
        holding = [(base, prefix) for base, prefix in self._bases() if _inside(absolute, base)]
        if not holding:
            return os.path.basename(absolute)
        base, prefix = max(holding, key=lambda b: len(b[0]))
        rel = os.path.relpath(absolute, base).replace(os.sep, "/")
        return f"{prefix}/{rel}" if prefix else rel

    def servable(self, path: str | os.PathLike) -> bool:
        """True when the file's real path lies under a root or the upload folder."""
        real = os.path.realpath(path)
        return any(_inside(real, os.path.realpath(base)) for base, _ in self._bases())

    def is_upload(self, path: str | os.PathLike) -> bool:
        """True for a file the server stored itself (directly in the upload folder)."""
        if self._upload_dir is None:
            return False
        return os.path.dirname(os.path.realpath(path)) == os.path.realpath(self._upload_dir)
