"""One JSON shape for every error the API returns, and nothing else leaks out.

Clients get ``{"error": {"status", "code", "message"}}``. Every error the package raises
for a user derives from :class:`cbir.errors.CbirError` and carries its HTTP status and
code, so one handler maps them all; the framework's own errors (unknown route, request
validation, body too large) get the same shape. The traceback of an unexpected failure
goes to the server log only, under a request id the client sees (see
:mod:`cbir.serve.middleware`).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cbir.errors import CbirError

log = logging.getLogger("cbir.serve")


class ApiError(CbirError):
    """An error only the HTTP layer knows (a missing token, a bad form): status and code
    are given per instance rather than per class."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = code
        self.headers = headers


#: Codes fixed here rather than derived from ``http.HTTPStatus`` phrases, which change
#: between Python versions (413 became "Content Too Large" in 3.13).
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
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
    """The one error shape: ``{"error": {"status", "code", "message"}}``."""
    return {"error": {"status": status, "code": code or error_code(status), "message": message}}


async def cbir_error(request: Request, exc: Exception) -> JSONResponse:
    """Any :class:`CbirError`: its own status and code, its message (written for users)."""
    assert isinstance(exc, CbirError)
    status = int(exc.http_status)
    code = exc.code if exc.code != CbirError.code else error_code(status)
    if status >= 500:
        log.warning("%s: %s", code, exc)
    headers = getattr(exc, "headers", None)
    return JSONResponse(error_body(status, str(exc), code), status, headers=headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors: unknown route (404), wrong method (405), body over the limit
    (413, from its body-size middleware)."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers
    )


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter validation, as one readable line (``k: Input should be ...``)."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return JSONResponse(error_body(422, "; ".join(parts) or "invalid request"), 422)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers above on ``app``."""
    app.add_exception_handler(CbirError, cbir_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
