"""One error base for the whole package.

Every error that a user can act on derives from :class:`CbirError`. The CLI maps it to a
message and an exit code in one place, the HTTP server to a status and a code in one
place; anything else escaping is a bug and keeps its traceback. A subclass sets
``exit_code`` (the CLI's process status) and ``http_status`` (the server's answer) where
the defaults (1 and 400) do not fit.
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
