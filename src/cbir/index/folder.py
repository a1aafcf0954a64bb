"""The index folder: its files, how it is created atomically, and how damage is recognised.

Layout (``.cbir`` by default)::

    descriptor.cbir      the descriptor that made every vector (self-contained file)
    catalog.sqlite       files, hashes, status/errors and the raw float32 vectors (the truth)
    vectors/             the FAISS store: store.json, base-<gen>.faiss, journal-<gen>.log,
                         trained-<key>.faiss (rebuildable from the catalogue)
    lock                 flock'ed by the process that writes

Creation happens under the lock and is re-checked under it, so two first runs cannot both
create. The catalogue is written under a temporary name, the descriptor saved, and the
catalogue renamed into place last: a folder has either no index, a complete one, or an
interrupted creation that the next writer finishes (the temporary catalogue names the
saved descriptor's identity). Anything else (a catalogue without its descriptor, a
descriptor without its catalogue) is damage, and the index refuses to touch it rather
than create over it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cbir.defaults import DEFAULT_DB as DEFAULT_DB  # written once, in cbir.defaults
from cbir.fileio import fsync_dir
from cbir.index import faults
from cbir.index.catalog import Catalog
from cbir.index.errors import IndexDamagedError, IndexNotFoundError
from cbir.models.descriptor import Descriptor

DESCRIPTOR_FILE = "descriptor.cbir"
CATALOG_FILE = "catalog.sqlite"
CREATING_FILE = ".catalog.sqlite.creating"
STORE_DIR = "vectors"
LOCK_FILE = "lock"
#: Files of the layout before the store split (a single whole-index cache): removed.
_OLD_CACHES = ("vectors-*.faiss", "trained-*.faiss")


@dataclass(frozen=True)
class Layout:
    """Paths of one index folder."""

    folder: Path

    @property
    def descriptor(self) -> Path:
        return self.folder / DESCRIPTOR_FILE

    @property
    def catalog(self) -> Path:
        return self.folder / CATALOG_FILE

    @property
    def creating(self) -> Path:
        return self.folder / CREATING_FILE

    @property
    def store(self) -> Path:
        return self.folder / STORE_DIR

    @property
    def lock(self) -> Path:
        return self.folder / LOCK_FILE

    def state(self) -> str:
        """``absent``, ``complete``, ``interrupted`` (a creation to finish), ``no-catalog``
        or ``no-descriptor`` (damage)."""
        has_cat, has_desc = self.catalog.exists(), self.descriptor.exists()
        if has_cat and has_desc:
            return "complete"
        if has_cat:
            return "no-descriptor"
        if has_desc:
            return "interrupted" if self.creating.exists() else "no-catalog"
        return "absent"

    def repair_hint(self, dirs: str = "DIR") -> str:
        """The commands that rebuild this index into a fresh folder, keeping the old one."""
        aside = f"{self.folder}.damaged"
        model = f" --model {aside}/{DESCRIPTOR_FILE}" if self.descriptor.exists() else ""
        return f"mv {self.folder} {aside} && cbir index {dirs} --db {self.folder}{model}"


def damaged(layout: Layout, state: str) -> IndexDamagedError:
    """The error for a damaged folder: what is wrong and how to repair it."""
    if state == "no-descriptor":
        made_by = _made_by(layout.catalog)
        return IndexDamagedError(
            f"index damaged: {layout.descriptor} is missing, so the vectors in {layout.catalog}"
            f"{made_by} cannot be compared with anything. Restore {DESCRIPTOR_FILE} from a backup "
            f"(its identity must match), or index the images again: {layout.repair_hint()}"
        )
    return IndexDamagedError(
        f"index damaged: {layout.catalog} is missing (the descriptor is intact). Restore it from "
        f"a backup, or index the images again with the same descriptor: {layout.repair_hint()}"
    )


def _made_by(path: Path) -> str:
    """`` (descriptor NAME, identity ID)`` from a catalogue's meta, if it can be read."""
    meta = Catalog.peek_meta(path, ["descriptor", "identity"])
    return f" (descriptor {meta.get('descriptor')}, identity {meta.get('identity')})" if meta else ""


def check_openable(layout: Layout, *, readonly: bool) -> str:
    """Raise unless the folder holds an index to open; returns its state (``complete``, or
    ``interrupted`` for a writer to finish)."""
    state = layout.state()
    if state == "absent":
        raise IndexNotFoundError(f"no index in {layout.folder}: create one with 'cbir index DIR --db {layout.folder}'")
    if state == "interrupted" and readonly:
        raise IndexNotFoundError(f"the index in {layout.folder} is being created (or its creation was interrupted)")
    if state in ("no-catalog", "no-descriptor"):
        raise damaged(layout, state)
    return state


def finish_creation(layout: Layout) -> bool:
    """Complete a creation that stopped after saving the descriptor (the caller holds the
    lock): rename the temporary catalogue into place if it belongs to that descriptor."""
    try:
        descriptor = Descriptor.load(layout.descriptor)
    except (ValueError, OSError, RuntimeError, EOFError):
        return False
    identity = Catalog.peek_meta(layout.creating, ["identity"]).get("identity")
    if identity is None or identity != descriptor.identity():
        return False
    os.replace(layout.creating, layout.catalog)
    fsync_dir(layout.folder)
    return True


def create(layout: Layout, descriptor: Descriptor, meta: dict[str, str]) -> None:
    """Write a new index into an empty folder (the caller holds the lock and has checked
    that the state is ``absent``)."""
    for leftover in (layout.creating, *(layout.folder / (CREATING_FILE + s) for s in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    Catalog.create(layout.creating, meta)
    descriptor.save(layout.descriptor)
    faults.point("create.descriptor_saved")
    os.replace(layout.creating, layout.catalog)
    fsync_dir(layout.folder)


def clean_temporaries(layout: Layout) -> None:
    """Remove what interrupted writes and older layouts left (the caller holds the lock)."""
    for pattern in (".*.tmp", *_OLD_CACHES):
        for p in layout.folder.glob(pattern):  # .*.tmp: fileio's atomic writes killed half-way
            with contextlib.suppress(OSError):
                p.unlink()
