"""The index's user-facing errors, all under :class:`CbirIndexError` (a :class:`CbirError`).

Each one says what happened and what the user can do about it; the CLI prints the message
with the class's exit code and the server answers with its HTTP status.
"""

from __future__ import annotations

from cbir.errors import CbirError


class CbirIndexError(CbirError):
    """Base class of the index's errors; the message is meant for the user."""

    code = "index_error"


#: The name this base had before the split (a trailing underscore: not the builtin).
IndexError_ = CbirIndexError


class IndexNotFoundError(CbirIndexError):
    """The folder holds no index (and creating one was not asked for)."""

    exit_code = 5
    http_status = 404
    code = "no_index"


class IndexDamagedError(CbirIndexError):
    """A file of the index folder is missing, unreadable or inconsistent; the message says
    what is wrong and how to repair it. Nothing is overwritten while this is raised."""

    exit_code = 5
    http_status = 500
    code = "index_damaged"


class DescriptorMismatchError(CbirIndexError):
    """Vectors or a descriptor that differ from the ones the index was built with."""

    exit_code = 2
    code = "descriptor_mismatch"


class IndexBusyError(CbirIndexError):
    """Another process is writing to this index."""

    exit_code = 3
    http_status = 409
    code = "index_busy"


class IndexNotTrainedError(CbirIndexError):
    """The FAISS type needs training and the collection is too small for it."""

    code = "index_not_trained"


class QueryError(CbirIndexError):
    """The query could not be turned into a vector."""

    exit_code = 4
    code = "bad_query"
