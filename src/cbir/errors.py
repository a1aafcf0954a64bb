"""One error base for the whole package.

Every error that a user can act on derives from :class:`CbirError`. The CLI maps it to a
message and an exit code in one place, the HTTP server to a status and a code in one
place; anything else escaping is a bug and keeps its traceback. A subclass sets
``exit_code`` (the CLI's process status) and ``http_status`` (the server's answer) where
the defaults (1 and 400) do not fit. The statuses are documented in docs/cli.md: 0 ok,
1 unexpected, 2 invalid usage, 3 index busy, 4 bad input, 5 index missing or damaged.
"""

from __future__ import annotations


class CbirError(Exception):
    """Base of cbir's user-facing errors; the message is written for the user."""

    #: process exit status the CLI uses for this error (see docs/cli.md, "Exit codes")
    exit_code: int = 1
    #: HTTP status the server answers with
    http_status: int = 400
    #: machine-readable code in the server's JSON error body
    code: str = "error"


class UsageError(CbirError):
    """An argument that cannot be used as given (a bad option value, a conflicting pair)."""

    exit_code = 2
    http_status = 400
    code = "invalid_argument"


class InputError(CbirError):
    """Input the command cannot work on: a file where a folder is expected, a folder with no
    images, an image that cannot be read."""

    exit_code = 4
    http_status = 422
    code = "bad_input"


#: The documented process exit statuses (docs/cli.md, "Exit codes").
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_INPUT = 4
EXIT_INDEX = 5
