"""A folder of precomputed embeddings: Parquet shards, the descriptor, a manifest.

Layout of ``OUT_DIR`` (written by ``cbir extract --ray``, read by ``cbir index --from``)::

    descriptor.cbir                 the descriptor that made every vector
    embeddings/part-<key>.parquet   one row per image: path, size, mtime_ns, sha256,
                                    vector (fixed-size float32 list; null when it failed),
                                    error (null when it worked)
    manifest.json                   descriptor identity, counts, the failures and reasons
    lock                            flock'ed by the run that writes

Shards are the unit of crash safety. A shard is written under a temporary name and renamed
(:mod:`cbir.fileio`), so a killed writer leaves a ``.tmp`` file that the next run deletes,
never a half-written shard. Its name is a hash of the rows' (path, size, mtime_ns) keys,
so a block that Ray re-runs after a worker died replaces its own earlier shard instead of
adding a second copy of the same rows. Shards hold rows of failed images too (with their
reason), so a re-run skips them like described ones until the file changes.

Plain PyArrow and no Ray here: the format is read on machines that never run Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.distributed.deps import require
from cbir.errors import CbirError
from cbir.fileio import atomic_write_by_name, atomic_write_text

DESCRIPTOR_FILE = "descriptor.cbir"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "embeddings"
FORMAT = "cbir-embeddings"
VERSION = 1
KEY_COLUMNS = ("path", "size", "mtime_ns")


class EmbeddingsError(CbirError):
    """An embeddings folder that cannot be read or written as asked."""


def _pa() -> Any:
    return require("pyarrow", "Parquet embeddings")


def _pq() -> Any:
    return require("pyarrow.parquet", "Parquet embeddings")


def schema(dim: int) -> Any:
    """The Arrow schema of a shard of ``dim``-d vectors."""
    pa = _pa()
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("mtime_ns", pa.int64(), nullable=False),
            pa.field("sha256", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("error", pa.string()),
        ]
    )


def rows_table(
    dim: int,
    paths: list[str],
    sizes: list[int],
    mtimes: list[int],
    shas: list[str | None],
    vectors: np.ndarray,
    errors: list[str | None],
) -> Any:
    """One shard's table; ``vectors`` (N x dim) rows of failed images are stored as null."""
    pa = _pa()
    failed = np.array([e is not None for e in errors], dtype=bool)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    vector = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(failed))
    return pa.Table.from_arrays(
        [pa.array(paths, pa.string()), pa.array(sizes, pa.int64()), pa.array(mtimes, pa.int64()),
         pa.array(shas, pa.string()), vector, pa.array(errors, pa.string())],
        schema=schema(dim),
    )  # fmt: skip


def key_digests(paths: list[str], sizes: Any, mtimes: Any) -> np.ndarray:
    """16-byte digests of (path, size, mtime_ns), in row order. Sorted, they are a compact,
    zero-copy-shareable set of what is written (160 MB for 10^7 rows) for :func:`contains`."""
    out = np.empty(len(paths), dtype="S16")
    for i, (path, size, mtime) in enumerate(zip(paths, sizes, mtimes, strict=True)):
        out[i] = hashlib.blake2b(f"{path}\0{int(size)}\0{int(mtime)}".encode(), digest_size=16).digest()
    return out


def contains(sorted_digests: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """Which of ``digests`` are in ``sorted_digests`` (boolean mask)."""
    if len(sorted_digests) == 0:
        return np.zeros(len(digests), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_digests, digests), len(sorted_digests) - 1)
    return sorted_digests[pos] == digests


def shard_name(table: Any) -> str:
    """``part-<hash of the rows' keys>.parquet``: the same rows always get the same name."""
    h = hashlib.sha256()
    keys = zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS), strict=True)
    for path, size, mtime in sorted(keys):
        h.update(f"{path}\0{size}\0{mtime}\n".encode())
    return f"part-{h.hexdigest()[:32]}.parquet"


def write_shard(shard_dir: str | os.PathLike, table: Any) -> str:
    """Write ``table`` as one shard, atomically; returns its file name."""
    name = shard_name(table)
    atomic_write_by_name(Path(shard_dir) / name, lambda tmp: _pq().write_table(table, tmp))
    return name


@dataclass
class Embeddings:
    """Rows read back from a folder: the newest row per path, failures apart."""

    paths: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray
    shas: list[str]
    vectors: np.ndarray
    failures: list[tuple[str, str]] = field(default_factory=list)


class EmbeddingsFolder:
    """``OUT_DIR`` of a distributed extraction (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.descriptor_path = self.root / DESCRIPTOR_FILE
        self.manifest_path = self.root / MANIFEST_FILE
        self.shard_dir = self.root / SHARD_DIR
        self.lock_path = self.root / "lock"

    # -- writing -------------------------------------------------------------------------
    def prepare(self, descriptor: Any) -> None:
        """Create the folder for ``descriptor``, or check that it already holds its vectors.

        Vectors of two descriptors are incomparable, so a folder is never shared by two.
        """
        stored = self.identity()
        if stored is None and self.shards():
            raise EmbeddingsError(
                f"{self.root} holds embeddings but no {DESCRIPTOR_FILE}: "
                "it was modified by hand; use a new folder"
            )
        if stored is not None and stored != descriptor.identity():
            raise EmbeddingsError(
                f"{self.root} holds vectors of another descriptor (identity {stored}); "
                f"{descriptor.describe_name()} has identity {descriptor.identity()}: "
                "use another --out folder, or the same descriptor options"
            )
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        if stored is None:
            descriptor.save(self.descriptor_path)

    def clean(self) -> int:
        """Delete temporaries of killed writers and shards that do not read back; the rows
        of a deleted shard are simply described again. Returns the number of shards deleted."""
        for tmp in self.shard_dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        damaged = 0
        for shard in self.shards():
            try:
                _pq().read_metadata(shard)
            except Exception:  # noqa: BLE001 - any unreadable footer: the shard is lost
                shard.unlink()
                damaged += 1
        return damaged

    def write_manifest(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Summarise every shard (counts, failures) into ``manifest.json``, atomically."""
        keys = self._scan(("path", "mtime_ns", "error"))
        newest = _newest_per_path(keys)
        failed = [(keys["path"][i], keys["error"][i]) for i in newest if keys["error"][i] is not None]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "descriptor": self.descriptor_info(),
            "rows": len(newest) - len(failed),
            "failed": len(failed),
            "superseded": len(keys["path"]) - len(newest),
            "shards": len(self.shards()),
            "failures": [{"path": p, "reason": r} for p, r in sorted(failed)],
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        return manifest

    # -- reading -------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.shard_dir.glob("part-*.parquet")) if self.shard_dir.is_dir() else []

    def identity(self) -> str | None:
        """The identity of the folder's descriptor (None for a new folder)."""
        if not self.descriptor_path.is_file():
            return None
        return self.load_descriptor().identity()

    def load_descriptor(self) -> Any:
        from cbir.models.descriptor import Descriptor

        try:
            return Descriptor.load(self.descriptor_path)
        except ValueError as exc:
            raise EmbeddingsError(str(exc)) from exc

    def descriptor_info(self) -> dict[str, Any]:
        d = self.load_descriptor()
        return {"name": d.describe_name(), "identity": d.identity(), "dim": int(d.dim)}

    def done_keys(self) -> np.ndarray:
        """:func:`key_digests` of every row written: what a re-run skips."""
        keys = self._scan(KEY_COLUMNS)
        return np.sort(key_digests(keys["path"], keys["size"], keys["mtime_ns"]))

    def _scan(self, columns: tuple[str, ...]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {c: [] for c in columns}
        for shard in self.shards():
            table = _pq().read_table(shard, columns=list(columns))
            for c in columns:
                out[c].extend(table.column(c).to_pylist())
        return out

    def iter_rows(self, batch_rows: int = 65536) -> Iterator[Embeddings]:
        """The described rows in batches (newest row per path; failures in ``failures``),
        streaming the vectors shard by shard so memory stays at one batch."""
        keys = self._scan(("path", "mtime_ns"))
        keep = np.zeros(len(keys["path"]), dtype=bool)
        keep[_newest_per_path(keys)] = True
        dim = self.descriptor_info()["dim"]
        start = 0
        for shard in self.shards():
            pf = _pq().ParquetFile(shard)
            for batch in pf.iter_batches(batch_size=batch_rows):
                stop = start + batch.num_rows
                yield _to_embeddings(batch, keep[start:stop], dim)
                start = stop


def _newest_per_path(keys: dict[str, list[Any]]) -> list[int]:
    """Row numbers of the newest row (largest mtime_ns, then last written) of each path."""
    best: dict[str, tuple[int, int]] = {}
    for i, (path, mtime) in enumerate(zip(keys["path"], keys["mtime_ns"], strict=True)):
        cur = best.get(path)
        if cur is None or mtime >= cur[0]:
            best[path] = (mtime, i)
    return sorted(i for _, i in best.values())


def _to_embeddings(batch: Any, keep: np.ndarray, dim: int) -> Embeddings:
    pa = _pa()
    batch = batch.filter(pa.array(keep))
    errors = batch.column("error").to_pylist()
    ok = np.array([e is None for e in errors], dtype=bool)
    good = batch.filter(pa.array(ok))
    vectors = good.column("vector").flatten().to_numpy(zero_copy_only=False)
    return Embeddings(
        paths=good.column("path").to_pylist(),
        sizes=good.column("size").to_numpy(),
        mtimes=good.column("mtime_ns").to_numpy(),
        shas=good.column("sha256").to_pylist(),
        vectors=np.asarray(vectors, dtype=np.float32).reshape(-1, dim),
        failures=[
            (p, e) for p, e in zip(batch.column("path").to_pylist(), errors, strict=True) if e is not None
        ],
    )
