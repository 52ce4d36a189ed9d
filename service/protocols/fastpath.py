"""An ASGI fast path for ``POST /predict``.

Small models are bound by the HTTP path, not the engine: every layer of routing,
middleware, dependency solving and response classes costs more than the
inference itself. ``FastPathApp`` answers ``POST /predict`` before FastAPI's
middleware stack, straight from the ASGI messages, with the same
``predict_native`` the documented FastAPI route uses, the same error bodies and
the same ``X-Request-ID`` rule; every other request goes down the normal stack.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from engines.errors import EngineError
from service.errors import ServiceError, native_body, status_of
from service.protocols.inference import disconnect_waiter, read_body
from service.protocols.native import predict_native
from service.request_id import HEADER, REQUEST_ID, client_request_id, new_request_id
from service.state import AppState

log = logging.getLogger("kiln.errors")

_JSON_HEADERS = [(b"content-type", b"application/json")]


class FastPathApp(FastAPI):
    """FastAPI, with ``POST /predict`` answered before the middleware stack."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            state: AppState | None = getattr(self.state, "kiln", None)
            if state is not None:
                await answer_predict(state, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def answer_predict(state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one ``POST /predict`` from its ASGI messages."""
    raw_id = client_request_id(scope["headers"])
    request_id = raw_id.decode("ascii") if raw_id is not None else new_request_id()
    REQUEST_ID.set(request_id)
    headers = _HeaderLookup(scope["headers"])
    try:
        body = await read_body(receive, state.settings.max_request_bytes, headers("content-length"))
        content = await predict_native(state, body, headers=headers, disconnected=disconnect_waiter(receive))
        status, extra = 200, []
    except (ServiceError, EngineError) as exc:
        status, kind, message, error_headers = status_of(exc)
        content = native_body(kind, message)
        extra = [(k.lower().encode(), v.encode()) for k, v in error_headers.items()]
    except Exception:
        log.exception("unhandled error on POST /predict")
        status, content, extra = 500, native_body("internal", "internal error; see the server log"), []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *_JSON_HEADERS,
                (b"content-length", str(len(content)).encode()),
                (HEADER, request_id.encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


class _HeaderLookup:
    """``headers("name")`` over raw ASGI headers, decoded lazily."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __call__(self, name: str) -> str | None:
        key = name.encode()
        for header, value in self._raw:
            if header.lower() == key:
                return value.decode("latin-1")
        return None
