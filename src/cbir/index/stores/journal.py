"""An append-only journal of vector additions and removals, with a checksum per segment.

Why: rewriting a whole index file for every change costs O(collection) (13 s for one
upload into a million vectors). A change is instead appended here as one segment, O(change),
and folded into a new base file only now and then (compaction).

Layout (little-endian)::

    file header  b"CBIRJNL1", base generation u64, dim u32, 4 pad bytes, xxh3_64 of the above
    segment      b"SEG1", generation u64, n_add u32, n_remove u32,
                 add ids int64[n_add], add vectors float32[n_add, dim], remove ids int64[n_remove],
                 xxh3_64 of the segment's bytes before it

A segment is written at a known offset and fsync'ed before the catalogue commits, so a
crash leaves at most a torn or uncommitted segment at the tail; readers stop at the first
segment that is incomplete, fails its checksum, or is newer than the generation they want,
and the next writer truncates the file there before appending.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from cbir.fileio import atomic_write_bytes, fsync_dir
from cbir.index import faults

_MAGIC = b"CBIRJNL1"
_FILE = struct.Struct("<8sQI4x")
_FILE_SUM = struct.Struct("<Q")
HEADER_BYTES = _FILE.size + _FILE_SUM.size
_SEG = struct.Struct("<4sQII")
_SEG_MAGIC = b"SEG1"
_SUM = struct.Struct("<Q")
#: Largest segment read back (a torn length field must not make us allocate gigabytes).
MAX_SEGMENT_BYTES = 1 << 30


class JournalError(Exception):
    """The journal file is unusable (missing, wrong header): rebuild from the catalogue."""


@dataclass
class Segment:
    """One flushed change set, labelled with the catalogue generation it produces."""

    generation: int
    add_ids: np.ndarray
    add_vectors: np.ndarray
    remove_ids: np.ndarray

    def encode(self, dim: int) -> bytes:
        ids = np.ascontiguousarray(self.add_ids, dtype="<i8")
        vecs = np.ascontiguousarray(self.add_vectors, dtype="<f4").reshape(len(ids), dim)
        rem = np.ascontiguousarray(self.remove_ids, dtype="<i8")
        body = b"".join(
            (_SEG.pack(_SEG_MAGIC, self.generation, len(ids), len(rem)), ids.tobytes(), vecs.tobytes(), rem.tobytes())
        )
        return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


@dataclass
class Scan:
    """What :meth:`Journal.scan` read: the accepted segments and where they end."""

    segments: list[Segment]
    end: int  #: offset just after the last accepted segment
    stopped: str  #: why reading stopped: "end", "newer", "torn" or "corrupt"


class Journal:
    """``journal-<base generation>.log`` beside the base file it extends."""

    def __init__(self, path: Path, dim: int, base_generation: int) -> None:
        self.path = path
        self.dim = dim
        self.base_generation = base_generation

    def create(self) -> None:
        """Write an empty journal (header only), atomically."""
        head = _FILE.pack(_MAGIC, self.base_generation, self.dim)
        atomic_write_bytes(self.path, head + _FILE_SUM.pack(xxhash.xxh3_64_intdigest(head)))

    def _check_header(self, fh: object) -> None:
        raw = fh.read(HEADER_BYTES)  # type: ignore[attr-defined]
        if len(raw) != HEADER_BYTES:
            raise JournalError(f"{self.path.name}: header incomplete")
        head, (digest,) = raw[: _FILE.size], _FILE_SUM.unpack(raw[_FILE.size :])
        magic, base_gen, dim = _FILE.unpack(head)
        if magic != _MAGIC or digest != xxhash.xxh3_64_intdigest(head):
            raise JournalError(f"{self.path.name}: not a cbir journal, or its header is damaged")
        if base_gen != self.base_generation or dim != self.dim:
            raise JournalError(
                f"{self.path.name}: written for base generation {base_gen} and {dim}-d vectors, "
                f"expected {self.base_generation} and {self.dim}"
            )

    def scan(self, offset: int, upto: int) -> Scan:
        """Segments from ``offset`` (0: the start) up to generation ``upto`` included."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise JournalError(f"{self.path.name} is missing") from exc
        with fh:
            if offset == 0:
                self._check_header(fh)
                offset = HEADER_BYTES
            fh.seek(offset)
            segments: list[Segment] = []
            for seg, end, stopped in self._read(fh, offset):
                if seg is None:
                    return Scan(segments, offset, stopped)
                if seg.generation > upto:
                    return Scan(segments, offset, "newer")
                segments.append(seg)
                offset = end
            return Scan(segments, offset, "end")

    def _read(self, fh: object, offset: int) -> Iterator[tuple[Segment | None, int, str]]:
        """Yield (segment, end offset, "") per good segment; (None, _, reason) to stop."""
        read = fh.read  # type: ignore[attr-defined]
        row = 8 + 4 * self.dim
        while True:
            head = read(_SEG.size)
            if not head:
                yield None, offset, "end"
                return
            if len(head) < _SEG.size:
                yield None, offset, "torn"
                return
            magic, gen, n_add, n_rem = _SEG.unpack(head)
            size = n_add * row + 8 * n_rem
            if magic != _SEG_MAGIC or size > MAX_SEGMENT_BYTES:
                yield None, offset, "corrupt"
                return
            payload = read(size + _SUM.size)
            if len(payload) < size + _SUM.size:
                yield None, offset, "torn"
                return
            (digest,) = _SUM.unpack(payload[size:])
            if digest != xxhash.xxh3_64_intdigest(head + payload[:size]):
                yield None, offset, "corrupt"
                return
            ids = np.frombuffer(payload, "<i8", n_add, 0).astype(np.int64)
            vecs = np.frombuffer(payload, "<f4", n_add * self.dim, 8 * n_add).reshape(n_add, self.dim)
            rem = np.frombuffer(payload, "<i8", n_rem, n_add * row).astype(np.int64)
            offset += _SEG.size + size + _SUM.size
            yield Segment(int(gen), ids, vecs.astype(np.float32), rem), offset, ""

    def append(self, segments: list[Segment], at: int) -> int:
        """Write ``segments`` at offset ``at`` (dropping whatever follows it: a torn or
        uncommitted tail), fsync, and return the new end offset."""
        data = b"".join(s.encode(self.dim) for s in segments)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size != at:
                os.ftruncate(fd, at)
            half = len(data) // 2
            _pwrite_all(fd, memoryview(data)[:half], at)
            faults.point("journal.write")  # a crash here leaves a torn segment
            _pwrite_all(fd, memoryview(data)[half:], at + half)
            os.fsync(fd)
        finally:
            os.close(fd)
        return at + len(data)

    def truncate(self, at: int) -> None:
        """Cut the file at ``at`` (a writer dropping a tail no catalogue generation reached)."""
        with open(self.path, "r+b") as fh:
            fh.truncate(at)
            fh.flush()
            os.fsync(fh.fileno())

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


def remove_quietly(*paths: Path) -> None:
    """Delete files that may already be gone, then make the deletion durable."""
    folders = set()
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            folders.add(p.parent)
    for f in folders:
        fsync_dir(f)
