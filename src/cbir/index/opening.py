"""Creating and opening an index folder: the steps before an :class:`~cbir.index.Index`
exists, with the integrity checks of :mod:`cbir.index.folder` (kept apart from the facade,
which is about using an index)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from cbir.index import folder as fl
from cbir.index.catalog import Catalog
from cbir.index.errors import CbirIndexError, DescriptorMismatchError, IndexBusyError, IndexDamagedError
from cbir.index.locks import BusyError, FileLock
from cbir.index.settings import resolve_descriptor
from cbir.models.descriptor import Descriptor


@contextlib.contextmanager
def locked(layout: fl.Layout, wait: float) -> Iterator[None]:
    """The folder's writer lock for the block (:class:`IndexBusyError` when busy)."""
    try:
        with FileLock(layout.lock).hold(wait):
            yield
    except BusyError as exc:
        raise IndexBusyError(str(exc)) from exc


def create_folder(
    layout: fl.Layout, descriptor: Descriptor, meta: dict[str, str], *, wait: float, exist_ok: bool
) -> bool:
    """Create the index files under the lock, after re-checking the folder under it;
    returns True if this call created them (False: a complete index was there)."""
    layout.folder.mkdir(parents=True, exist_ok=True)
    with locked(layout, wait):
        state = layout.state()
        if state == "interrupted" and fl.finish_creation(layout):
            state = "complete"
        if state == "absent":
            fl.clean_temporaries(layout)
            fl.create(layout, descriptor, meta)
            return True
        if state != "complete":
            raise fl.damaged(layout, state)
        if not exist_ok:
            raise CbirIndexError(f"an index already exists in {layout.folder}: open it instead")
        return False


def open_catalog(layout: fl.Layout, model: Any, *, readonly: bool, wait: float) -> tuple[Catalog, Descriptor]:
    """The catalogue and descriptor of an existing index, checked against each other and
    against ``model`` (finishing an interrupted creation first, under the lock)."""
    if fl.check_openable(layout, readonly=readonly) == "interrupted":
        with locked(layout, wait):
            if not fl.finish_creation(layout):
                raise fl.damaged(layout, "no-catalog")
    catalog = Catalog(layout.catalog, readonly=readonly)
    try:
        return catalog, stored_descriptor(layout, catalog, model)
    except BaseException:
        catalog.close()
        raise


def stored_descriptor(layout: fl.Layout, catalog: Catalog, model: Any) -> Descriptor:
    """The folder's descriptor, checked against the catalogue and against ``model``."""
    stored = catalog.get_meta("identity")
    if stored is None:
        raise IndexDamagedError(f"index damaged: {layout.catalog} records no descriptor. {layout.repair_hint()}")
    try:
        descriptor = Descriptor.load(layout.descriptor)
    except (ValueError, RuntimeError, OSError, EOFError) as exc:
        raise IndexDamagedError(
            f"index damaged: {layout.descriptor} cannot be read ({exc}). {layout.repair_hint()}"
        ) from exc
    if descriptor.identity() != stored:
        raise IndexDamagedError(
            f"index damaged: {layout.descriptor} (identity {descriptor.identity()}) is not the descriptor "
            f"that made the catalogue's vectors (identity {stored}): restore the right file from a backup"
        )
    if model is not None:
        wanted = resolve_descriptor(model)
        if wanted.identity() != stored:
            raise DescriptorMismatchError(
                f"the index in {layout.folder} was built with descriptor {catalog.get_meta('descriptor')} "
                f"(identity {stored}); {wanted.describe_name()} (identity {wanted.identity()}) makes "
                "incomparable vectors: use another --db, or leave out the model options"
            )
    return descriptor
