"""POST /predict: kiln's native JSON inference endpoint (the hot path).

The body is read raw and parsed with orjson; pydantic stays out of the hot path.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from engines.errors import EngineError
from service.auth import require_predict_key
from service.codecs import decode_native_inputs
from service.errors import BadRequest, PayloadTooLarge, ServiceError, Unavailable, status_of
from service.limits import check_json_shape
from service.responses import dumps
from service.state import get_state

router = APIRouter(tags=["inference"])


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def disconnect_waiter(request: Request) -> Any:
    receive = request.receive

    async def wait() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    return wait


@router.post("/predict", dependencies=[Depends(require_predict_key)])
async def predict(request: Request) -> Response:
    """``{"engine", "version"?, "inputs", "timeout_ms"?}`` → ``{"engine", "version", "outputs"}``."""
    started = time.perf_counter()
    state = get_state(request)
    engine, version_label, code = "", "", 500
    try:
        if state.draining:
            raise Unavailable("the server is shutting down", headers={"Retry-After": "1"})
        body = await read_body(request, state.settings.max_request_bytes)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadRequest('the body must be a JSON object: {"engine": ..., "inputs": ...}')
        check_json_shape(payload, state.settings.max_json_depth, state.settings.max_tensor_elements)
        engine = payload.get("engine")
        if not isinstance(engine, str) or not engine:
            raise BadRequest("'engine' (the engine's name) is required")
        version = payload.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise BadRequest("'version' must be a positive integer")
        if "inputs" not in payload:
            raise BadRequest("'inputs' is required")
        timeout_ms = payload.get("timeout_ms")
        if timeout_ms is not None and (not isinstance(timeout_ms, int | float) or timeout_ms <= 0):
            raise BadRequest("'timeout_ms' must be a positive number")
        found = state.registry.servable(engine, version)
        version_label = str(found.version)
        signature = found.signature
        assert signature is not None and found.batcher is not None
        feeds = decode_native_inputs(
            payload["inputs"], signature, max_elements=state.settings.max_tensor_elements
        )
        assert found.runner is not None
        found.runner.check_feeds(feeds)
        outputs = await found.batcher.infer(
            feeds, timeout_ms=timeout_ms, disconnected=disconnect_waiter(request)
        )
        code = 200
        return Response(
            dumps({"engine": engine, "version": found.version, "outputs": outputs}),
            media_type="application/json",
        )
    except (ServiceError, EngineError) as exc:
        code = status_of(exc)[0]
        raise
    finally:
        if engine and version_label:
            state.metrics.requests.labels(engine, version_label, "native", str(code)).inc()
            state.metrics.request_duration.labels(engine, version_label, "native").observe(
                time.perf_counter() - started
            )
