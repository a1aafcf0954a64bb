"""The search engine: an index folder kept in step with image folders, searched by image.

>>> from cbir.index import Index
>>> with Index.create(".cbir") as idx:          # doctest: +SKIP
...     idx.sync(["photos/"])
...     hits = idx.search("photos/cat.jpg", k=10)

See docs/indexing.md for the folder layout, the journal, sync planning and integrity.
"""

from cbir.index.catalog import ImageRecord
from cbir.index.errors import (
    CbirIndexError,
    DescriptorMismatchError,
    IndexBusyError,
    IndexDamagedError,
    IndexError_,
    IndexNotFoundError,
    IndexNotTrainedError,
    QueryError,
)
from cbir.index.facade import Hit, Index
from cbir.index.folder import DEFAULT_DB
from cbir.index.sync import file_sha256
from cbir.index.writer import SyncReport

__all__ = [
    "DEFAULT_DB",
    "CbirIndexError",
    "DescriptorMismatchError",
    "Hit",
    "ImageRecord",
    "Index",
    "IndexBusyError",
    "IndexDamagedError",
    "IndexError_",
    "IndexNotFoundError",
    "IndexNotTrainedError",
    "QueryError",
    "SyncReport",
    "file_sha256",
]
