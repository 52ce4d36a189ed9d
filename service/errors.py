"""One table from exception type to HTTP status, and one error body.

Native routes answer ``{"error": {"type": ..., "message": ...}}``; KServe v2 routes
answer ``{"error": "..."}`` as Triton does. 5xx bodies carry a generic message and
the details go to the log.

Overload is 503 with ``Retry-After`` (the backlog's drain time, rounded up to whole
seconds; ``retry-after-ms`` carries it in milliseconds), never 429: 429 says *this
client* sent too many requests and should slow down, while an overloaded engine is
the server's shortage, which another replica may not share. Proxies and clients
retry 503 elsewhere (Envoy's ``retry_on: 5xx``, nginx's ``proxy_next_upstream
http_503``, gRPC's UNAVAILABLE) and do not retry 429 by default. A request whose
own deadline passed before it could run is 504.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engines import errors as engine_errors
from service.refusals import DeadlinePassed, Refused
from service.request_id import REQUEST_ID

log = logging.getLogger("kiln.errors")


class ServiceError(Exception):
    """An error with its HTTP status; raised by the service layer."""

    status = 400
    kind = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.details = details


class BadRequest(ServiceError):
    status, kind = 400, "bad_request"


class Unauthorized(ServiceError):
    status, kind = 401, "unauthorized"


class Forbidden(ServiceError):
    status, kind = 403, "forbidden"


class NotFound(ServiceError):
    status, kind = 404, "not_found"


class Conflict(ServiceError):
    status, kind = 409, "conflict"


class NotReady(ServiceError):
    status, kind = 409, "not_ready"


class PayloadTooLarge(ServiceError):
    status, kind = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, kind = 415, "unsupported_media_type"


class TooManyEngines(ServiceError):
    status, kind = 429, "limit_reached"


class Unavailable(ServiceError):
    """Queue full or server draining: retry later, maybe on another replica."""

    status, kind = 503, "unavailable"


class DeadlineExceeded(ServiceError):
    status, kind = 504, "deadline_exceeded"


# Every error that has a status of its own (anything else is a 500).
MAPPED_ERRORS = (ServiceError, engine_errors.EngineError, Refused, DeadlinePassed)

# engines errors → HTTP status. Build-time errors (accuracy, build failures) mostly
# surface as a version's failed state; when raised inside a request they map here.
_ENGINE_STATUS: dict[type[engine_errors.EngineError], int] = {
    engine_errors.InvalidModel: 400,
    engine_errors.CalibrationError: 400,
    engine_errors.InvalidInput: 400,
    engine_errors.InferenceFailed: 500,
    engine_errors.UnsupportedModel: 422,
    engine_errors.AccuracyRejected: 422,
    engine_errors.BuildFailed: 422,
    engine_errors.BackendUnavailable: 503,
    engine_errors.DeviceLost: 503,
    engine_errors.StoreCorrupted: 500,
    # Models and data named by URI (s3://, https://)
    engine_errors.InvalidSource: 400,
    engine_errors.ObjectNotFound: 400,
    engine_errors.ChecksumMismatch: 400,
    engine_errors.ObjectAccessDenied: 403,
    engine_errors.TooLarge: 413,
    engine_errors.ObjectStoreUnavailable: 503,
}


def status_of(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """(status, type, message, headers) for any exception."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.kind, exc.message, exc.headers
    if isinstance(exc, Refused):
        return 503, "unavailable", exc.message, retry_after_headers(exc.retry_after_s)
    if isinstance(exc, DeadlinePassed):
        return 504, "deadline_exceeded", exc.message, {}
    if isinstance(exc, engine_errors.EngineError):
        for cls in type(exc).__mro__:
            if cls in _ENGINE_STATUS:
                status = _ENGINE_STATUS[cls]
                message = exc.message if status < 500 else "internal error; see the server log"
                return status, exc.kind, message, {}
        return 500, "internal", "internal error; see the server log", {}
    return 500, "internal", "internal error; see the server log", {}


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (all HTTP allows, rounded up) and
    ``retry-after-ms`` with the estimate itself, as some APIs' clients read it."""
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, round(seconds * 1000))),
    }


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds to wait before retrying, at full precision (gRPC's RetryInfo carries
    it; HTTP's Retry-After only whole seconds)."""
    if isinstance(exc, Refused):
        return exc.retry_after_s
    if isinstance(exc, ServiceError) and "Retry-After" in exc.headers:
        return float(exc.headers["Retry-After"])
    return None


def native_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": kind, "message": message}})


def kserve_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def is_kserve(request: Request) -> bool:
    return request.url.path.startswith("/v2")


def error_response(request: Request, exc: BaseException) -> Response:
    status, kind, message, headers = status_of(exc)
    request_id = REQUEST_ID.get()
    if request_id is not None and not isinstance(exc, ServiceError | engine_errors.EngineError | Refused):
        # Unexpected errors are answered outside the request-id middleware.
        headers = {**headers, "X-Request-ID": request_id}
    if status >= 500 and not isinstance(exc, ServiceError):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = kserve_body(message) if is_kserve(request) else native_body(kind, message)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _handle(request: Request, exc: Exception) -> Response:
    return error_response(request, exc)


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail)
    body = kserve_body(message) if is_kserve(request) else native_body(kind, message)
    return Response(body, status_code=exc.status_code, headers=exc.headers, media_type="application/json")


async def _handle_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    message = "; ".join(problems) or "invalid request"
    body = kserve_body(message) if is_kserve(request) else native_body("bad_request", message)
    return Response(body, status_code=400, media_type="application/json")


def install_error_handlers(app: Any) -> None:
    app.add_exception_handler(ServiceError, _handle)
    app.add_exception_handler(engine_errors.EngineError, _handle)
    app.add_exception_handler(Refused, _handle)
    app.add_exception_handler(DeadlinePassed, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(Exception, _handle)
