"""Applying changes to an index: the sync pipeline and the commit protocol.

Every change goes through :meth:`IndexWriter.commit`: one catalogue transaction in which
the vector store's change is flushed (journal written and fsync'ed) *before* the catalogue
commits. A crash before the commit leaves the store one batch ahead, which the next open
drops; a crash after it leaves both in step. Nothing in between is ever visible: searches
are held off (the index's write lock) from the flush to the commit.

The sync pipeline: walk and stat (no file opened), plan (:mod:`cbir.index.sync`), hash
the new or changed files, commit what needs no model (touches, moves, copies, deletions),
then describe the rest in batches, one commit per batch, so a killed run resumes where it
stopped. A file that changes between hashing and description (its size, mtime, ctime or
inode differ afterwards) is not committed with a hash of other bytes: it is hashed and
described again, up to :data:`MAX_ROUNDS` times.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cbir.data.decode import DEFAULT_MAX_PIXELS
from cbir.extract import Failure, iter_extract
from cbir.index import faults
from cbir.index.catalog import NewRow, _Transaction
from cbir.index.errors import DescriptorMismatchError, IndexNotTrainedError
from cbir.index.locks import BusyError
from cbir.index.query import l2n
from cbir.index.stores import reconcile
from cbir.index.sync import FileStat, Todo, changed_since, file_sha256, plan_changes, plan_sync
from cbir.postprocess import alpha_dba

if TYPE_CHECKING:
    from cbir.index.facade import Index

#: Rounds of re-describing files that change while being described, before giving up.
MAX_ROUNDS = 3
#: What a commit hands the store: (ids to add, their vectors, ids to remove).
StoreChange = tuple[Sequence[int], np.ndarray | None, Sequence[int]]


@dataclass
class SyncReport:
    """What a sync/add did. ``extracted`` counts files run through the model; a rerun on
    unchanged files reports 0."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    extracted: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = [asdict(f) for f in self.failures]
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class RunOptions:
    """How to run the model over the files to describe."""

    progress: bool = True
    batch_size: int = 32
    workers: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS


class IndexWriter:
    """The mutating half of an :class:`~cbir.index.Index` (the caller holds its writer lock)."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # -- the commit protocol -------------------------------------------------------------
    def commit(self, work: Callable[[_Transaction], StoreChange]) -> None:
        """Run ``work`` in one catalogue transaction; mirror its vector change into the
        store, flushed before the commit (write-ahead)."""
        idx = self.index
        with idx._rw.write():
            try:
                with idx.catalog.transaction() as tx:
                    add_ids, add_vectors, remove_ids = work(tx)
                    if len(add_ids) or len(remove_ids):
                        generation = tx.bump_generation()
                        if len(remove_ids):
                            idx.store.remove(np.asarray(remove_ids, dtype=np.int64))
                        if len(add_ids):
                            idx.store.add(np.asarray(add_ids, dtype=np.int64), add_vectors)
                        idx.store.flush(generation)
                        faults.point("commit.before")
            except BaseException:
                idx.store.discard()
                if idx.store.generation != idx.catalog.generation:
                    self.attach_store(locked=True)  # the store flushed what was not committed
                raise
        faults.point("commit.after")

    # -- sync / add / remove -------------------------------------------------------------
    def run(self, files: Iterable[FileStat], scope: list[str], opts: RunOptions) -> SyncReport:
        """Bring the catalogue in line with ``files``. ``scope``: the synced roots (missing
        files under them are deleted; the whole catalogue is planned against). Without a
        scope (an ``add``), only the records of these files and of their contents are read,
        so adding one file to a million costs O(1)."""
        idx = self.index
        report = SyncReport()
        files = list(files)
        snapshot = idx.catalog.records() if scope else idx.catalog.records_for(paths=[f.path for f in files])
        plan = plan_sync(files, snapshot, scope=scope, exists=os.path.exists)
        report.unchanged = plan.unchanged
        hashed = list(self._hash(plan.to_hash, report, opts.progress))
        if not scope:  # records with the same content: sources of moves and copies
            known = {r.id for r in plan.records}
            extra = [r for r in idx.catalog.records_for(shas=[h for _, h, _ in hashed]) if r.id not in known]
            walked = {f.path for f in files}
            plan.records += extra
            plan.gone += [r for r in extra if r.path not in walked and not os.path.exists(r.path)]
        changes, touched = plan_changes(plan, hashed)
        report.unchanged += touched
        self._check_trainable(len(changes.extract) + len(changes.copies) - len(changes.deletes))
        if changes.metadata_only():
            self.commit(lambda tx: self._metadata(tx, changes, report))
        self._describe(changes.extract, report, opts)
        self.finish()
        return report

    def _hash(
        self, items: list[tuple[FileStat, Any]], report: SyncReport, progress: bool
    ) -> Iterator[tuple[FileStat, str, Any]]:
        for f, row in _progress(items, "hashing", progress):
            try:
                yield f, file_sha256(f.path), row
            except OSError as exc:
                report.failures.append(Failure(f.path, f"cannot read file: {exc.strerror or exc}"))
                report.failed += 1

    def _check_trainable(self, growth: int) -> None:
        """Refuse before spending time on the model when the index type cannot be trained
        on what the collection will hold."""
        idx = self.index
        need = idx.store.min_vectors
        if need and not getattr(idx.store, "trained", True):
            expected = idx.catalog.counts()["ok"] + growth
            if expected < need:
                raise IndexNotTrainedError(
                    f"index type {idx.index_factory!r} needs at least {need} vectors to train, this "
                    f"collection would have {expected}: index more images, or choose a smaller type "
                    "(e.g. 'Flat', or --index auto)"
                )

    def _metadata(self, tx: _Transaction, changes: Any, report: SyncReport) -> StoreChange:
        """Touches, moves, copies and deletions: no model needed."""
        tx.touch(changes.touches)
        tx.move(changes.moves)
        report.moved += len(changes.moves)
        removed, removed_ok = tx.delete(changes.deletes)
        report.removed += removed
        added, vectors = [], []
        for source_id, row in changes.copies:
            new_id, vector = tx.copy(source_id, row)
            added.append(new_id)
            vectors.append(vector)
        report.added += len(added)
        return added, np.stack(vectors) if vectors else None, removed_ok

    def _describe(self, todo: list[Todo], report: SyncReport, opts: RunOptions) -> None:
        idx = self.index
        for _round in range(MAX_ROUNDS):
            if not todo:
                return
            changed: list[Todo] = []
            batches = iter_extract(
                idx.descriptor, [t.path for t in todo], batch_size=opts.batch_size, workers=opts.workers,
                max_pixels=opts.max_pixels, engine=idx.engine, **idx.engine_options, progress=opts.progress,
                desc="indexing",
            )  # fmt: skip
            for batch in batches:
                faults.point("extract.batch")
                report.extracted += len(batch.indices) + len(batch.failures)
                changed += self._commit_batch(todo, batch.indices, batch.vectors, batch.failures, report)
                idx.store.compact(idx.catalog.source(idx.dim), bulk=True)
            todo = self._rehash(changed, report)
        for t in todo:
            report.failed += 1
            report.failures.append(Failure(t.path, "the file kept changing while it was described; next sync"))

    def _rehash(self, changed: list[Todo], report: SyncReport) -> list[Todo]:
        """Files that changed during description, hashed again for another round."""
        out = []
        for t in changed:
            try:
                stat = FileStat.of(t.path)
                sha = file_sha256(t.path)
            except OSError:
                continue  # deleted meanwhile: the next sync removes its record
            out.append(Todo(stat, sha, self.index.catalog.by_path(t.path)))
        return out

    def _commit_batch(
        self,
        todo: list[Todo],
        indices: list[int],
        vectors: np.ndarray,
        failures: list[tuple[int, Failure]],
        report: SyncReport,
    ) -> list[Todo]:
        """Commit one described batch (rows + vectors in one transaction); returns the
        files that changed since they were hashed (not committed)."""
        dim = self.index.dim
        if vectors.ndim != 2 or (len(indices) and vectors.shape[1] != dim):
            raise DescriptorMismatchError(f"extraction produced {vectors.shape} vectors for a {dim}-d index")
        vectors = l2n(vectors) if len(indices) else np.zeros((0, dim), np.float32)
        stale = {i for i in [*indices, *(i for i, _ in failures)] if changed_since(todo[i].stat)}
        good = [(i, v) for i, v in zip(indices, vectors, strict=True) if i not in stale]
        bad = [(i, f) for i, f in failures if i not in stale]

        def work(tx: _Transaction) -> StoreChange:
            kept = [i for i, _ in good] + [i for i, _ in bad]
            _, removed_ok = tx.delete([todo[i].row.id for i in kept if todo[i].row is not None])
            rows = [_row(todo[i], vector=v) for i, v in good] + [_row(todo[i], error=f.reason) for i, f in bad]
            ids = tx.insert(rows)
            return ids[: len(good)], np.stack([v for _, v in good]) if good else None, removed_ok

        if good or bad:
            self.commit(work)
        new = sum(1 for i, _ in good if todo[i].row is None)
        report.added += new
        report.updated += len(good) - new
        report.failed += len(bad)
        report.failures += [f for _, f in bad]
        return [todo[i] for i in sorted(stale)]

    def remove_ids(self, ids: Sequence[int]) -> int:
        removed = 0

        def work(tx: _Transaction) -> StoreChange:
            nonlocal removed
            removed, had_vector = tx.delete(ids)
            return [], None, had_vector

        self.commit(work)
        self.finish()
        return removed

    # -- keeping the store in step ------------------------------------------------------
    def attach_store(self, *, locked: bool) -> None:
        """Bring the store to the catalogue's generation: replay what it has, else repair
        it from the catalogue, durably when this process may write (it takes the lock),
        in memory when it may not (a reader, or another process is writing)."""
        idx = self.index
        target = idx.catalog.generation
        dba_stale = bool(idx.settings.dba) and idx.settings.dba_generation != target
        if not dba_stale and idx.store.load(target) and idx.store.count() == idx.catalog.counts()["ok"]:
            return
        if not idx.readonly and not locked:
            with contextlib.suppress(BusyError), idx._writer, idx._flock.hold(0):
                self.attach_store(locked=True)
                return
        if idx.readonly or not locked:
            idx.store.readonly, idx._detached = True, True
            self.repair()
            return
        idx.store.readonly, idx._detached = False, False
        if dba_stale:
            self.rebuild_all()
        else:
            self.repair()
        idx.store.tidy()

    def repair(self) -> None:
        """Repair the store from the catalogue: by id difference, or a rebuild when DBA is on,
        nothing durable is left, or the store is ahead of the catalogue."""
        idx = self.index
        target = idx.catalog.generation
        source = idx.catalog.source(idx.dim)
        if idx.settings.dba or idx.store.generation < 0 or idx.store.generation > target:
            idx.store.rebuild(source, target)  # DBA vectors change under the same ids
        else:
            reconcile(idx.store, source, target)

    # -- after a mutation ----------------------------------------------------------------
    def finish(self) -> None:
        """After a mutation: refresh DBA if due, re-plan an ``auto`` index, compact the
        store if due."""
        idx = self.index
        if idx.dba and idx.settings.dba_generation != idx.catalog.generation:
            self.rebuild_all()
        elif not idx._replan():
            idx.store.compact(idx.catalog.source(idx.dim))

    def rebuild_all(self, meta: dict[str, str] | None = None) -> None:
        """Rebuild the store from the catalogue in one transaction, after applying ``meta``
        (new settings) and recomputing the DBA vectors (or clearing them), under a new
        generation; the store is rebuilt before the commit (write-ahead), so a crash
        leaves the old settings with the old store, or the new with the new.

        Database-side augmentation (Arandjelovic & Zisserman 2012; alpha-weighted as in
        Radenovic et al. 2018): the store indexes each vector plus its ``dba`` nearest
        neighbours; raw vectors stay in the catalogue. Neighbourhoods change when the
        collection does, so every change recomputes all of them (exact, O(n^2): meant
        for collections up to about 10^5 images)."""
        idx = self.index
        with idx._rw.write():
            try:
                with idx.catalog.transaction() as tx:
                    if meta:
                        tx.set_meta(meta)
                    if idx.dba:
                        ids, raw = idx.catalog.all_vectors(dim=idx.dim)
                        tx.set_augmented(ids, alpha_dba(raw, k=idx.dba, alpha=idx.dba_alpha) if len(raw) else raw)
                    else:
                        tx.clear_augmented()
                    generation = tx.bump_generation()
                    tx.set_meta({"dba_generation": str(generation)})
                    if meta:
                        idx._swap_store()  # a store for the new plan
                    idx.store.rebuild(idx.catalog.source(idx.dim), generation)  # sees this transaction
            except BaseException:
                if meta:
                    idx._swap_store()  # back to the committed settings
                self.attach_store(locked=True)
                raise
        idx.store.tidy()


def _row(todo: Todo, *, vector: np.ndarray | None = None, error: str | None = None) -> NewRow:
    s = todo.stat
    return NewRow(s.path, s.size, s.mtime_ns, todo.sha256, vector=vector, error=error)


def _progress(items: list[Any], desc: str, enabled: bool) -> Iterator[Any]:
    if len(items) < 200:  # not worth a bar
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit="file", disable=not enabled, leave=False, dynamic_ncols=True)


def timed(report: SyncReport, start: float) -> SyncReport:
    report.seconds = time.perf_counter() - start
    return report
