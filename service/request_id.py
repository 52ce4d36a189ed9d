"""Request ids: one per request (HTTP or gRPC), echoed in ``X-Request-ID`` (gRPC:
``x-request-id`` response metadata) and put on log lines.

A pure ASGI middleware (``BaseHTTPMiddleware`` costs a task and a stream per
request). The client's ``X-Request-ID`` is kept when it is sane (1-128 characters
of ``[A-Za-z0-9._-]``), so ids can be followed across a proxy; otherwise a new one
is made. The id lives in a context variable for the rest of the request: the JSON
log formatter reads it, and background tasks started by the request (a build
started by an upload) inherit it.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"

REQUEST_ID: ContextVar[str | None] = ContextVar("kiln_request_id", default=None)
"""The current request's id; None outside a request."""

_SANE = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def new_request_id() -> str:
    """A fresh random id: 32 hex digits (as many bits as a UUID4)."""
    return os.urandom(16).hex()


def client_request_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The client's ``X-Request-ID`` if it is sane; None otherwise."""
    for name, value in headers:
        if name == HEADER or (len(name) == len(HEADER) and name.lower() == HEADER):
            return sane_request_id(value)
    return None


def sane_request_id(value: bytes) -> bytes | None:
    """``value`` if it is fit to be a request id; None otherwise."""
    return value if _SANE.fullmatch(value) else None


def adopt_request_id(raw: bytes | None) -> str:
    """Set ``REQUEST_ID`` for the current request from the client's sane id
    (``client_request_id``) or a new one, and return it. The variable is not reset on the way out:
    each request runs in its own task (its own context), and an error handler
    further out that logs an unhandled exception should still see the id."""
    request_id = raw.decode("ascii") if raw is not None else new_request_id()
    REQUEST_ID.set(request_id)
    return request_id


class RequestIdMiddleware:
    """Sets ``REQUEST_ID`` for each HTTP request and adds ``X-Request-ID`` to its
    response. It is the outermost middleware, and ``FastPathApp`` wraps its own
    answers in it too, so every response carries the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (HEADER, adopt_request_id(client_request_id(scope["headers"])).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
