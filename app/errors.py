"""The service's errors and the one place that turns them, and every other error, into HTTP answers.

    ServiceError                  a request the service cannot answer as asked
     ├── Unauthorized        401  no API key, or an unknown or revoked one, where one is needed (docs/rest.md)
     ├── Forbidden           403  a valid key whose role may not do this (an integrator's under /api/admin)
     ├── NotFound            404  nothing there (a pair with no rate yet at that moment, or one never fetched)
     ├── InvalidRequest      422  well-formed, but not possible now (refreshing a pair never stored); names fields
     ├── TooManyRequests     429  over a limit (docs/limits.md); says when to retry
     ├── RateUnavailable     503  no rate stored and the upstream cannot give one now; says when to retry
     │    └── DatabaseUnavailable  503  the answer needs the database, which cannot be reached now
     └── TooManyClients      503  no room for another stream (`WS_MAX_CLIENTS`, per address), or shutting down

Every error under `/api` has the body `{"status": "error", "message": "…", "data": null}`
(docs/errors.md), validation errors add `errors`, a list naming each bad field. A database error
that escaped the guards of `app.storage.health` is still answered as `DatabaseUnavailable`, never a 500.
"""

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class NotFound(ServiceError):
    status_code = 404


class Unauthorized(ServiceError):
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    status_code = 403


class InvalidRequest(ServiceError):
    status_code = 422

    def __init__(self, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.errors = errors


class _RetryLater(ServiceError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after(self.retry_after_s)}


class TooManyRequests(_RetryLater):
    status_code = 429


class RateUnavailable(_RetryLater):
    status_code = 503


class Withheld(ServiceError):
    """An operator withheld the pair: it is not served until it is resumed (docs/operations.md, "Corridors")."""

    status_code = 503


class TooManyClients(_RetryLater):
    """A stream refused before it started (`GET /sse/rates`, docs/sse.md): the process holds as many clients as it
    may, in all or from this address, or it is shutting down; says when to retry."""

    status_code = 503


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, at least 1 (0 would invite an immediate retry)."""
    return str(max(1, math.ceil(seconds)))


class DatabaseUnavailable(RateUnavailable):
    """A subclass of RateUnavailable: wherever a rate is unavailable, this is one more reason (docs/outages.md)."""

    def __init__(
        self, message: str = "The database cannot be reached right now; try again shortly.", *, retry_after_s: float
    ) -> None:
        super().__init__(message, retry_after_s)


def error_body(message: str, errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"status": "error", "message": message, "data": None}
    if errors is not None:
        body["errors"] = errors
    return body


def _field(loc: tuple[int | str, ...]) -> str:
    # ("query", "source_currency") -> "source_currency"; a whole-body error keeps its place.
    parts = [str(part) for part in loc if part not in ("query", "path", "body")]
    return ".".join(parts) or str(loc[0] if loc else "request")


def _describe(item: dict[str, Any]) -> str:
    message = str(item["msg"]).removeprefix("Value error, ")
    return message[0].upper() + message[1:] if message else "Invalid value"


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = [{"field": _field(tuple(item["loc"])), "message": _describe(item)} for item in error.errors()]
    first = errors[0] if errors else {"field": "request", "message": "Invalid request"}
    message = f"Invalid {first['field']}: {first['message'].rstrip('.')}."
    return JSONResponse(error_body(message, errors), status_code=422)


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    errors = error.errors if isinstance(error, InvalidRequest) else None
    return JSONResponse(error_body(error.message, errors), status_code=error.status_code, headers=error.headers())


_HTTP_MESSAGES = {404: "No such endpoint.", 405: "Method not allowed; this API answers GET."}


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    detail = error.detail if isinstance(error.detail, str) else None
    message = _HTTP_MESSAGES.get(error.status_code) or (detail or "Request failed.")
    allowed = {method.strip() for method in (error.headers or {}).get("Allow", "").split(",") if method.strip()}
    if error.status_code == 405 and not allowed <= {"GET", "HEAD"}:
        message = f"Method not allowed; this path answers {', '.join(sorted(allowed))}."
    return JSONResponse(error_body(message), status_code=error.status_code, headers=error.headers)


async def _database_error(request: Request, error: Exception) -> JSONResponse:
    # A safety net: database calls go through app.storage.health, which already turned this into DatabaseUnavailable.
    log.warning("database error on %s %s: %s", request.method, request.url.path, type(error).__name__)
    return await _service_error(request, DatabaseUnavailable(retry_after_s=5.0))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse(error_body("Internal error; it has been logged."), status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
