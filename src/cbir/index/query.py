"""Turning a query into a vector: an indexed path (its stored vector), a file, encoded bytes,
a PIL image or a vector; and which catalogue entries are the query itself.

Separate from the index so the model runner (loaded on the first query that needs it)
and the ways of naming a query live in one place.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from cbir.data.decode import DecodeError, load_pixels, to_rgb
from cbir.index.catalog import Catalog
from cbir.index.errors import DescriptorMismatchError, QueryError
from cbir.index.sync import file_sha256
from cbir.models.descriptor import Descriptor
from cbir.runtime import Runner, make_runner

#: What :meth:`cbir.index.Index.search` accepts as a query.
Query = Image.Image | np.ndarray | bytes | str | os.PathLike


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (inner product = cosine similarity)."""
    x = np.asarray(x, dtype=np.float32)
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


class QueryResolver:
    """Describes query images exactly as indexing does and finds a query's own entries."""

    def __init__(
        self, catalog: Catalog, descriptor: Descriptor, engine: str, engine_options: dict[str, Any] | None = None
    ) -> None:
        self.catalog = catalog
        self.descriptor = descriptor
        self.engine = engine
        self.engine_options = dict(engine_options or {})
        self.dim = int(descriptor.dim)
        self._runner: Runner | None = None
        self._runner_lock = threading.Lock()

    def _get_runner(self) -> Runner:
        with self._runner_lock:
            if self._runner is None:
                self._runner = make_runner(self.descriptor, self.engine, **self.engine_options)
            return self._runner

    def describe(self, image: Image.Image | bytes | str | os.PathLike) -> np.ndarray:
        """The descriptor of one image (PIL image, encoded bytes or a file), decoded and
        resized exactly as indexing does, so an indexed file describes to its own vector."""
        pre = self.descriptor.preprocess
        try:
            img = to_rgb(image) if isinstance(image, Image.Image) else load_pixels(image, target_size=pre.resized_size)
        except DecodeError as exc:
            raise QueryError(f"cannot read the query image: {exc.reason}") from exc
        out = self._get_runner()(pre.to_array(img)[None])
        return l2n(np.asarray(out, dtype=np.float32))[0]

    def resolve(self, query: Any) -> tuple[np.ndarray, set[int]]:
        """(unit query vector, ids of catalogue entries that are the query itself)."""
        if isinstance(query, np.ndarray):
            q = np.asarray(query, dtype=np.float32).reshape(-1)
            if q.size != self.dim:
                raise DescriptorMismatchError(
                    f"query vector has {q.size} values, this index holds {self.dim}-d vectors"
                )
            return l2n(q[None])[0], set()
        if isinstance(query, (bytes, bytearray, memoryview)):
            data = bytes(query)
            return self.describe(data), self.catalog.ids_with_sha(hashlib.sha256(data).hexdigest())
        if isinstance(query, Image.Image):
            return self.describe(query), set()
        if isinstance(query, (str, os.PathLike)):
            return self._resolve_path(os.path.abspath(os.fspath(query)), query)
        if isinstance(query, io.IOBase):
            return self.resolve(query.read())
        raise QueryError(f"unsupported query type {type(query).__name__}")

    def _resolve_path(self, path: str, given: Any) -> tuple[np.ndarray, set[int]]:
        rec = self.catalog.by_path(path)
        if rec is not None and rec.status == "ok":
            _, v = self.catalog.vectors([rec.id], dim=self.dim)
            if len(v):
                return v[0].copy(), {rec.id} | self.catalog.ids_with_sha(rec.sha256)
        if not os.path.isfile(path):
            raise QueryError(f"{given}: neither an indexed path nor an image file")
        return self.describe(path), self.catalog.ids_with_sha(file_sha256(path))
