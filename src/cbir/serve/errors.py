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


#: Codes fixed here rather than derived from ``http.HTTPStatus`` phrases, which change
#: between Python versions (413 became "Content Too Large" in 3.13).
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
}


def error_code(status: int) -> str:
    """``404`` -> ``"not_found"``: a stable code when no more specific one is set."""
    if status in _CODES:
        return _CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def error_body(status: int, message: str, code: str | None = None) -> dict[str, dict[str, object]]:
    return {"error": {"status": status, "code": code or error_code(status), "message": message}}
