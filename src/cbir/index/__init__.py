"""The search engine: an index folder kept in step with image folders, searched by image.

>>> from cbir.index import Index
>>> with Index.open(".cbir") as idx:          # doctest: +SKIP
...     idx.sync(["photos/"])
...     hits = idx.search("photos/cat.jpg", k=10)
"""

from cbir.index.catalog import ImageRecord
from cbir.index.engine import (
    DEFAULT_DB,
    DescriptorMismatchError,
    Hit,
    Index,
    IndexBusyError,
    IndexError_,
    IndexNotTrainedError,
    QueryError,
    SyncReport,
    file_sha256,
)

#: Alias with a friendlier name for ``except`` clauses.
CbirIndexError = IndexError_

__all__ = [
    "DEFAULT_DB",
    "CbirIndexError",
    "DescriptorMismatchError",
    "Hit",
    "ImageRecord",
    "Index",
    "IndexBusyError",
    "IndexError_",
    "IndexNotTrainedError",
    "QueryError",
    "SyncReport",
    "file_sha256",
]
