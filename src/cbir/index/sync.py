"""Sync planning: what to do about each file, from file metadata and the catalogue alone.

Two pure steps, testable without a model or a disk:

1. :func:`plan_sync` compares a walk (path, size, mtime in integer nanoseconds) with the
   catalogue's records. A file whose size and mtime match its record is unchanged and is
   never opened, so re-syncing an unchanged folder reads no image at all.
2. The files left (new, or size/mtime changed) are hashed by the caller, then
   :func:`plan_changes` sorts them: same content as before (a touch), a moved or renamed
   file (its record follows it), a copy of an indexed file (its vector is copied), or new
   content for the model.

The I/O around them (walking, stat, hashing) is in :func:`walk` and :func:`hash_files`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cbir.data.datasets import list_images
from cbir.index.catalog import ImageRecord, NewRow


@dataclass(frozen=True)
class FileStat:
    """A file as a walk saw it. ``ctime_ns`` and ``ino`` only serve to notice a file
    rewritten during a run (they are not stored: a copied index folder keeps working)."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    ino: int = 0

    @classmethod
    def of(cls, path: str) -> FileStat:
        st = os.stat(path)
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class SyncPlan:
    """The outcome of :func:`plan_sync`."""

    unchanged: int = 0
    #: new files and files whose size or mtime changed, with their record (None: new)
    to_hash: list[tuple[FileStat, ImageRecord | None]] = field(default_factory=list)
    #: records whose file is gone: the sources of moves
    gone: list[ImageRecord] = field(default_factory=list)
    #: ids of gone records under a synced root: deleted unless a move claims them
    deletable: set[int] = field(default_factory=set)
    #: the catalogue snapshot planned against (for copy detection)
    records: list[ImageRecord] = field(default_factory=list)


@dataclass
class Todo:
    """A file for the model: new (``row`` None) or changed content (``row`` its record,
    replaced by a row with a new id when its vector is committed)."""

    stat: FileStat
    sha256: str
    row: ImageRecord | None

    @property
    def path(self) -> str:
        return self.stat.path


@dataclass
class ChangeSet:
    """The outcome of :func:`plan_changes`: metadata changes, then extraction work."""

    touches: list[tuple[int, int, int, str]] = field(default_factory=list)  # id, size, mtime_ns, sha
    moves: list[tuple[int, str, int, int]] = field(default_factory=list)  # id, new path, size, mtime_ns
    copies: list[tuple[int, NewRow]] = field(default_factory=list)  # source id, new row
    deletes: list[int] = field(default_factory=list)
    extract: list[Todo] = field(default_factory=list)

    def metadata_only(self) -> bool:
        return bool(self.touches or self.moves or self.copies or self.deletes)


def under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both absolute)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def plan_sync(
    walk: Iterable[FileStat],
    snapshot: Sequence[ImageRecord],
    *,
    scope: Sequence[str],
    exists: Callable[[str], bool],
) -> SyncPlan:
    """Compare a walk with the catalogue. ``scope``: the synced roots (a record under one
    whose file is missing is deleted); records outside it whose file is missing
    (``exists`` says so) can only be the source of a move. No file is opened."""
    plan = SyncPlan(records=list(snapshot))
    by_path = {r.path: r for r in plan.records}
    seen: set[str] = set()
    for f in walk:
        seen.add(f.path)
        row = by_path.get(f.path)
        if row is not None and row.size == f.size and row.mtime_ns == f.mtime_ns:
            plan.unchanged += 1
        else:
            plan.to_hash.append((f, row))
    for path, row in by_path.items():
        if path in seen:
            continue
        in_scope = any(under(path, s) for s in scope)
        if in_scope or not exists(path):
            plan.gone.append(row)
            if in_scope:
                plan.deletable.add(row.id)
    return plan


def plan_changes(plan: SyncPlan, hashed: Iterable[tuple[FileStat, str, ImageRecord | None]]) -> tuple[ChangeSet, int]:
    """Sort hashed files into touches, moves, copies and extraction; returns the change
    set and how many hashed files turned out unchanged in content (touches)."""
    out = ChangeSet()
    deletable = set(plan.deletable)
    move_sources: dict[str, list[ImageRecord]] = {}
    for r in plan.gone:
        move_sources.setdefault(r.sha256, []).append(r)
    by_sha: dict[str, ImageRecord] | None = None
    for f, sha, row in hashed:
        if row is not None and row.sha256 == sha:
            out.touches.append((row.id, f.size, f.mtime_ns, sha))
            continue
        if row is None and move_sources.get(sha):
            src = move_sources[sha].pop(0)
            deletable.discard(src.id)
            out.moves.append((src.id, f.path, f.size, f.mtime_ns))
            continue
        if row is None:
            if by_sha is None:  # built once, only when a new file needs it
                by_sha = {r.sha256: r for r in plan.records if r.status == "ok" and r.id not in deletable}
            src_row = by_sha.get(sha)
            if src_row is not None:
                out.copies.append((src_row.id, NewRow(f.path, f.size, f.mtime_ns, sha)))
                continue
        out.extract.append(Todo(f, sha, row))
    out.deletes = sorted(deletable)
    return out, len(out.touches)


# -- the I/O around the plan --------------------------------------------------------------------
def walk(roots: Sequence[str], *, exclude: Sequence[str] = (), include_hidden: bool = False) -> Iterator[FileStat]:
    """Every image file under ``roots`` (absolute paths), stat'ed, never opened; ``exclude`` and
    ``include_hidden`` as in :func:`cbir.data.datasets.list_images`."""
    seen: set[str] = set()
    for root in roots:
        for p in list_images(root, exclude=exclude, include_hidden=include_hidden):
            path = os.path.abspath(p)
            if path in seen:
                continue
            seen.add(path)
            try:
                yield FileStat.of(path)
            except OSError:
                continue  # vanished since the listing


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash: recognises moved, renamed and copied files without the model."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def changed_since(stat: FileStat) -> bool:
    """Whether the file differs from ``stat`` now (rewritten, replaced or gone): its hash
    no longer describes what the model read."""
    try:
        now = FileStat.of(stat.path)
    except OSError:
        return True
    return (now.size, now.mtime_ns, now.ctime_ns, now.ino) != (stat.size, stat.mtime_ns, stat.ctime_ns, stat.ino)
