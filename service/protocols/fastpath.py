"""An ASGI fast path for the inference endpoints: ``POST /predict`` and
``POST /v2/models/{name}[/versions/{v}]/infer``.

Small models are bound by the HTTP path, not the engine: every layer of routing,
middleware, dependency solving and response classes costs more than the
inference itself. ``FastPathApp`` answers these two endpoints before FastAPI's
middleware stack, straight from the ASGI messages, with ``predict_native`` and
``infer_v2``. Their FastAPI routes exist only to document them in the OpenAPI
schema. The request id comes from the same ``RequestIdMiddleware`` that wraps
the rest of the app; errors get the same bodies as the routes' error handlers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service.errors import MAPPED_ERRORS, kserve_body, native_body, status_of
from service.protocols.inference import Body, disconnect_waiter, read_body
from service.protocols.kserve import infer_v2
from service.protocols.native import predict_native
from service.request_id import RequestIdMiddleware
from service.state import AppState
from service.tracing import request_span

log = logging.getLogger("kiln.errors")

_JSON = "application/json"
_V2_PREFIX = "/v2/models/"

_TARGET = "kiln.target"

Reader = Callable[[], Awaitable[Body]]


class FastPathApp(FastAPI):
    """FastAPI, with the inference endpoints answered before the middleware stack."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._fast = RequestIdMiddleware(self._answer_fast)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and hasattr(self.state, "kiln"):
            path = scope["path"]
            target = ("", None) if path == "/predict" else _v2_target(path)
            if target is not None:
                scope[_TARGET] = target
                await self._fast(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _answer_fast(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AppState = self.state.kiln
        headers = HeaderLookup(scope["headers"])
        disconnected = disconnect_waiter(receive)
        name, version = scope[_TARGET]
        if not name:  # POST /predict

            async def answer(read: Reader) -> tuple[bytes, dict[str, str]]:
                content = await predict_native(state, read, headers=headers, disconnected=disconnected)
                return content, {}

            await _respond(state, scope, receive, send, headers, answer, kserve=False)
            return

        async def answer_v2(read: Reader) -> tuple[bytes, dict[str, str]]:
            return await infer_v2(state, name, version, read, headers=headers, disconnected=disconnected)

        await _respond(state, scope, receive, send, headers, answer_v2, kserve=True)


def _v2_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) of ``/v2/models/{name}[/versions/{v}]/infer``."""
    if not (path.startswith(_V2_PREFIX) and path.endswith("/infer")):
        return None
    parts = path[len(_V2_PREFIX) :].split("/")
    if len(parts) == 2 and parts[0]:
        return parts[0], None
    if len(parts) == 4 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


async def _respond(
    state: AppState,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: HeaderLookup,
    answer: Callable[[Reader], Awaitable[tuple[bytes, dict[str, str]]]],
    *,
    kserve: bool,
) -> None:
    """Run ``answer`` (which reads the body when it needs it: a refusal need not)
    and send its result, or the error. A body left unread is dropped by the server
    as it arrives, and the connection stays open."""

    async def read() -> Body:
        return await read_body(receive, state.settings.max_request_bytes, headers("content-length"))

    with request_span(scope["path"], headers) as trace_headers:
        try:
            content, extra = await answer(read)
            status = 200
            if "Content-Type" not in extra:
                extra = {"Content-Type": _JSON, **extra}
        except MAPPED_ERRORS as exc:
            status, kind, message, extra = status_of(exc)
            content = kserve_body(message) if kserve else native_body(kind, message)
            extra = {"Content-Type": _JSON, **extra}
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            message = "internal error; see the server log"
            status, content = 500, kserve_body(message) if kserve else native_body("internal", message)
            extra = {"Content-Type": _JSON}
    if trace_headers:
        extra = {**extra, **trace_headers}
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(content)).encode()),
                *((k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


class HeaderLookup:
    """``headers("name")`` over raw ASGI headers, decoded lazily. ASGI servers give
    header names in lower case, and ``name`` is asked in lower case."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __call__(self, name: str) -> str | None:
        key = name.encode()
        for header, value in self._raw:
            if header == key:
                return value.decode("latin-1")
        return None
