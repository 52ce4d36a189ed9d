"""POST /predict: kiln's native JSON inference endpoint (the hot path).

The body is parsed with orjson; pydantic stays out of the hot path.
``predict_native`` is answered by the ASGI fast path
(``service/protocols/fastpath.py``); the FastAPI route below only documents the
endpoint in the OpenAPI schema.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from starlette.responses import Response

from service import tracing
from service.auth import check_key
from service.errors import BadRequest
from service.protocols.inference import LARGE_BODY_BYTES, Body, check_intake, counted, infer
from service.protocols.intake import parse_priority
from service.protocols.native_codec import decode_native_inputs
from service.protocols.offload import decode_json, decode_native_body
from service.protocols.responses import dumps
from service.state import AppState

router = APIRouter(tags=["inference"])


async def predict_native(
    state: AppState,
    read: Callable[[], Awaitable[Body]],
    *,
    headers: Callable[[str], str | None],
    disconnected: Callable[[], Awaitable[None]] | None,
) -> bytes:
    """Read (``read``) and run one native request body; returns the response body.

    Raises the errors of ``service.errors.MAPPED_ERRORS`` for every refusal (the
    caller maps them to a status and an error body)."""
    settings = state.settings
    with counted(state, "native") as record:
        if settings.protect_predict:
            check_key(headers, state.api_keys)
        check_intake(state)
        body = await read()
        large = len(body) > LARGE_BODY_BYTES
        limits = (settings.max_json_depth, settings.max_tensor_elements)
        if large:  # parsed in a worker process: orjson holds the GIL for a whole parse
            payload = await state.offload.in_process(decode_native_body, body, *limits)
        else:
            payload = decode_json(body, *limits)
        if not isinstance(payload, dict):
            raise BadRequest('the body must be a JSON object: {"engine": ..., "inputs": ...}')
        engine = payload.get("engine")
        if not isinstance(engine, str) or not engine:
            raise BadRequest("'engine' (the engine's name) is required")
        version = payload.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise BadRequest("'version' must be a positive integer")
        if "inputs" not in payload:
            raise BadRequest("'inputs' is required")
        timeout_ms = payload.get("timeout_ms")
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float) or timeout_ms <= 0
        ):
            raise BadRequest("'timeout_ms' must be a positive number")
        priority = parse_priority(payload.get("priority"))
        found = state.registry.servable(engine, version)
        signature = record.admit(found, header=(priority, timeout_ms))
        with tracing.span("decode"):
            decode = functools.partial(
                decode_native_inputs, payload["inputs"], signature, max_elements=settings.max_tensor_elements
            )
            feeds = await state.offload.in_thread(decode) if large else decode()
        outputs = await infer(
            found, feeds, timeout_ms=timeout_ms, priority=priority, disconnected=disconnected
        )
        with tracing.span("encode"):
            return dumps({"engine": engine, "version": found.version, "outputs": outputs})


@router.post("/predict")
async def predict() -> Response:
    """``{"engine", "version"?, "inputs", "timeout_ms"?, "priority"?}`` →
    ``{"engine", "version", "outputs"}``.

    Declared for the OpenAPI schema only: ``FastPathApp`` answers this path with
    ``predict_native`` before routing, so this handler never runs."""
    raise AssertionError("POST /predict is answered by FastPathApp")
