"""One JSON shape for every error the API returns, and nothing else leaks out.

Clients get ``{"error": {"status", "code", "message"}}``; the traceback of an
unexpected failure goes to the server log only, under a request id the client sees.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.exceptions import HTTPException


class ApiError(HTTPException):
    """An error with a machine-readable ``code`` besides the HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, message, headers=headers)
        self.code = code


def error_code(status: int) -> str:
    """``413`` -> ``"request_entity_too_large"``: a stable code when no specific one is set."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def error_body(status: int, message: str, code: str | None = None) -> dict[str, dict[str, object]]:
    return {"error": {"status": status, "code": code or error_code(status), "message": message}}
