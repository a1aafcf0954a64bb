"""Fill an index from precomputed vectors, without running the model (``cbir index --from``).

Two sources: an embeddings folder of Parquet shards (``cbir extract --ray``, with each
row's size, mtime and hash as they were described) and the ``.npy`` + manifest of
``cbir extract`` (which records no file stats, so they are taken here: a file modified
after that extraction began is left out, for the next sync to describe).

The index's descriptor must be the one that made the vectors (identity checked; a
mismatch is refused, never mixed). Rows go through the index's own commit protocol in
batches, so an interrupted import resumes (rows already in the index with the same size,
mtime and hash are skipped), and a later ``cbir index DIR`` sync finds the imported files
unchanged and describes nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir.distributed.embeddings import Embeddings, EmbeddingsError, EmbeddingsFolder
from cbir.models.descriptor import Descriptor

BATCH_ROWS = 20_000


@dataclass
class ImportReport:
    """What an import did; ``skipped`` lists rows left out, with the reason."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        counts = {"added": self.added, "updated": self.updated, "unchanged": self.unchanged, "failed": self.failed}
        skipped = [{"path": p, "reason": r} for p, r in self.skipped]
        return {**counts, "skipped": skipped, "seconds": round(self.seconds, 3)}


@dataclass
class _Source:
    descriptor: Descriptor | None  # None: the .npy manifest names only an identity
    identity: str
    name: str
    batches: Iterator[Embeddings]


def _parquet_source(folder: EmbeddingsFolder, batch_rows: int) -> _Source:
    if not folder.descriptor_path.is_file():
        raise EmbeddingsError(f"{folder.root} is not an embeddings folder (no descriptor.cbir)")
    d = folder.load_descriptor()
    return _Source(d, d.identity(), d.describe_name(), folder.iter_rows(batch_rows))


def _npy_source(npy: Path, batch_rows: int, skipped: list[tuple[str, str]]) -> _Source:
    """Rows of ``cbir extract``'s matrix, with stats and hashes taken now."""
    manifest_path = npy.with_suffix(".json")
    if not manifest_path.is_file():
        raise EmbeddingsError(f"{npy} has no manifest {manifest_path.name} beside it")
    manifest = json.loads(manifest_path.read_text())
    vectors = np.load(npy, mmap_mode="r")
    files = manifest.get("files", [])
    if vectors.ndim != 2 or len(files) != len(vectors):
        raise EmbeddingsError(f"{npy}: {vectors.shape} vectors for {len(files)} files in the manifest")
    started_ns = int((manifest_path.stat().st_mtime - float(manifest.get("seconds", 0)) - 1) * 1e9)
    desc = manifest.get("descriptor", {})
    return _Source(None, desc.get("identity", ""), desc.get("name", "?"),
                   _npy_batches(files, vectors, started_ns, batch_rows, skipped))  # fmt: skip


def _npy_batches(
    files: list[str], vectors: np.ndarray, started_ns: int, batch_rows: int, skipped: list[tuple[str, str]]
) -> Iterator[Embeddings]:
    from cbir.index import file_sha256

    for start in range(0, len(files), batch_rows):
        keep, stats, shas = [], [], []
        for i in range(start, min(start + batch_rows, len(files))):
            path = os.path.abspath(files[i])
            try:
                st = os.stat(path)
                if st.st_mtime_ns >= started_ns:
                    skipped.append((path, "modified after the extraction began: a sync describes it"))
                    continue
                shas.append(file_sha256(path))
            except OSError as exc:
                skipped.append((path, f"cannot read: {exc.strerror or exc}"))
                continue
            keep.append(i)
            stats.append((path, st.st_size, st.st_mtime_ns))
        yield Embeddings(paths=[s[0] for s in stats], sizes=np.array([s[1] for s in stats], np.int64),
                         mtimes=np.array([s[2] for s in stats], np.int64), shas=shas,
                         vectors=np.asarray(vectors[keep], np.float32))  # fmt: skip


def import_vectors(
    source: str | os.PathLike,
    db: str | os.PathLike,
    *,
    model: str | os.PathLike | Descriptor | None = None,
    store: str | None = None,
    wait: float = 0.0,
    batch_rows: int = BATCH_ROWS,
) -> ImportReport:
    """Import ``source`` (an embeddings folder, or an ``.npy`` with its manifest) into the
    index ``db``, created if needed with the vectors' descriptor (for an ``.npy``, ``model``
    must give it: its manifest records only the identity)."""
    from cbir.index import CbirIndexError, DescriptorMismatchError, Index
    from cbir.index.settings import resolve_descriptor

    start = time.perf_counter()
    report = ImportReport()
    src = Path(source)
    if src.is_dir():
        data = _parquet_source(EmbeddingsFolder(src), batch_rows)
    elif src.suffix in (".npy", ".json"):
        data = _npy_source(src.with_suffix(".npy"), batch_rows, report.skipped)
    else:
        raise EmbeddingsError(f"{src}: expected an embeddings folder (cbir extract --ray) or an .npy file")
    descriptor = data.descriptor
    if model is not None:
        descriptor = resolve_descriptor(model)
    if descriptor is not None and descriptor.identity() != data.identity:
        raise DescriptorMismatchError(
            f"{src} holds vectors of {data.name} (identity {data.identity}); {descriptor.describe_name()} "
            f"(identity {descriptor.identity()}) makes incomparable vectors: refused"
        )
    try:
        idx = Index.open(db, model=descriptor, create=descriptor is not None, store=store, wait=wait)
    except CbirIndexError as exc:
        if descriptor is None:  # no index yet, and an .npy manifest names no descriptor file
            raise EmbeddingsError(f"{exc}; to create it from {src}, give the descriptor options (--model ...)") from exc
        raise
    with idx:
        stored = idx.catalog.get_meta("identity")
        if stored != data.identity:  # an existing index opened without a model
            raise DescriptorMismatchError(
                f"the index in {db} was built with identity {stored}; {src} holds vectors of {data.name} "
                f"(identity {data.identity}): refused"
            )
        with idx.writer(wait):
            for batch in data.batches:
                _commit(idx, batch, report)
            idx._writes.finish()  # DBA, re-planning and compaction, as after a sync
    report.seconds = time.perf_counter() - start
    return report


def _commit(idx: Any, batch: Embeddings, report: ImportReport) -> None:
    """One batch through the index's commit protocol: new rows inserted, changed ones
    replaced, identical ones skipped; the store follows the catalogue (write-ahead)."""
    from cbir.index.catalog import NewRow
    from cbir.index.query import l2n

    report.failed += len(batch.failures)
    report.skipped += [(p, f"failed at extraction: {r}") for p, r in batch.failures]
    if batch.vectors.shape[1:] != (idx.dim,):
        raise EmbeddingsError(f"vectors of shape {batch.vectors.shape} for a {idx.dim}-d index")
    known = {r.path: r for r in idx.catalog.records_for(paths=batch.paths)}
    rows, replaced = [], []
    for i, path in enumerate(batch.paths):
        rec = known.get(path)
        row = NewRow(path, int(batch.sizes[i]), int(batch.mtimes[i]), batch.shas[i], vector=batch.vectors[i])
        if rec is not None and rec.status == "ok" and (rec.size, rec.mtime_ns, rec.sha256) == (
            row.size, row.mtime_ns, row.sha256,
        ):  # fmt: skip
            report.unchanged += 1
            continue
        if _changed_on_disk(row):
            report.skipped.append((path, "changed since it was described: a sync describes it"))
            continue
        rows.append(row)
        if rec is not None:
            replaced.append(rec.id)
    if not rows:
        return
    vectors = l2n(np.stack([r.vector for r in rows]))
    for r, v in zip(rows, vectors, strict=True):
        r.vector = v

    def work(tx: Any) -> tuple[list[int], np.ndarray, list[int]]:
        _, removed_ok = tx.delete(replaced)
        return tx.insert(rows), vectors, removed_ok

    idx._writes.commit(work)
    report.updated += len(replaced)
    report.added += len(rows) - len(replaced)


def _changed_on_disk(row: Any) -> bool:
    """True when the file is here and no longer the one described (a missing file is not:
    the images may live where this machine does not see them)."""
    try:
        st = os.stat(row.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns)
