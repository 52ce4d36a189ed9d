"""POST /predict: kiln's native JSON inference endpoint (the hot path).

The body is parsed with orjson; pydantic stays out of the hot path.
``predict_native`` is answered by the ASGI fast path
(``service/protocols/fastpath.py``); the FastAPI route below only documents the
endpoint in the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from service import tracing
from service.auth import check_key
from service.errors import BadRequest
from service.protocols.inference import check_intake, counted, infer
from service.protocols.intake import check_json_shape
from service.protocols.native_codec import decode_native_inputs
from service.protocols.responses import dumps
from service.state import AppState

router = APIRouter(tags=["inference"])


async def predict_native(
    state: AppState,
    body: bytes,
    *,
    headers: Callable[[str], str | None],
    disconnected: Callable[[], Awaitable[None]] | None,
) -> bytes:
    """Run one native request body; returns the response body.

    Raises ``ServiceError``/``EngineError`` for every refusal (the caller maps them
    to a status and an error body)."""
    settings = state.settings
    with counted(state, "native") as record:
        if settings.protect_predict:
            check_key(headers, state.api_keys)
        check_intake(state)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadRequest('the body must be a JSON object: {"engine": ..., "inputs": ...}')
        check_json_shape(payload, settings.max_json_depth, settings.max_tensor_elements)
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
        found = state.registry.servable(engine, version)
        signature = record.admit(found)
        with tracing.span("decode"):
            feeds = decode_native_inputs(
                payload["inputs"], signature, max_elements=settings.max_tensor_elements
            )
        outputs = await infer(found, feeds, timeout_ms=timeout_ms, disconnected=disconnected)
        with tracing.span("encode"):
            return dumps({"engine": engine, "version": found.version, "outputs": outputs})


@router.post("/predict")
async def predict() -> Response:
    """``{"engine", "version"?, "inputs", "timeout_ms"?}`` → ``{"engine", "version", "outputs"}``.

    Declared for the OpenAPI schema only: ``FastPathApp`` answers this path with
    ``predict_native`` before routing, so this handler never runs."""
    raise AssertionError("POST /predict is answered by FastPathApp")
