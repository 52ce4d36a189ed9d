"""KServe v2 REST routes (the protocol Triton speaks), on the same registry and
batchers as ``POST /predict``.

Tensor coding lives in ``service.protocols.kserve_codec``; these handlers resolve the
model, apply Triton's status rules and call the one inference path. Errors
answer ``{"error": "..."}`` (``service.errors`` does that for every /v2 path):
unknown model or version 404, a model that is not ready 503, malformed requests
400. Health and readiness answer 200 with an empty body, 400 otherwise, as
Triton does.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service import tracing
from service.auth import HeaderLookup, check_key, require_predict_key
from service.errors import BadRequest, NotReady, ServiceError, Unavailable
from service.health import not_ready_reason
from service.lifecycle.registry import EngineVersion, Registry
from service.protocols.inference import LARGE_BODY_BYTES, Body, check_intake, counted, infer
from service.protocols.kserve_codec import (
    INFERENCE_HEADER,
    config_type_of,
    content_encoding,
    datatype_of,
    decode_request,
    decompress_body,
    encode_infer_response,
    parse_big_request,
    parse_header_length,
    read_header,
)
from service.protocols.responses import JSONResponse
from service.state import AppState, get_state

router = APIRouter(prefix="/v2", tags=["kserve v2"])
model_router = APIRouter(prefix="/models/{name}", dependencies=[Depends(require_predict_key)])

# Advertise only what is implemented: perf_analyzer changes behaviour on this list
# (with "statistics" it calls the stats endpoints around every run).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "schedule_policy", "statistics")

_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}

INFLATE_INLINE_BYTES = 64 * 1024  # larger compressed bodies are inflated in a thread


def server_version() -> str:
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _empty(ok: bool) -> Response:
    return Response(status_code=200 if ok else 400)


def _version_number(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdecimal()) or int(text) < 1:
        raise BadRequest(f"model versions are positive integers; got '{text}'")
    return int(text)


def ready_version(registry: Registry, name: str, version: str | None) -> EngineVersion:
    """The named version (or the newest ready one) if it can serve now.

    ``NotFound`` (404) for an unknown model or version; ``Unavailable`` (503) for
    one that is building, loading or failed: Triton's UNAVAILABLE."""
    try:
        found = registry.servable(name, _version_number(version))
    except NotReady as exc:
        raise Unavailable(exc.message) from None
    return found


def ready_versions(registry: Registry, name: str) -> list[str]:
    return [str(v.version) for v in registry.versions(name) if v.servable]


def _backend(found: EngineVersion) -> str:
    if found.serving is not None:
        return found.serving.backend
    return str((found.meta or {}).get("backend", "onnxruntime"))


# -- server -------------------------------------------------------------------


@router.get("")
async def server_metadata() -> Response:
    """``{"name", "version", "extensions"}``."""
    return JSONResponse({"name": "kiln", "version": server_version(), "extensions": list(EXTENSIONS)})


@router.get("/health/live")
async def server_live() -> Response:
    """200 while the process answers."""
    return _empty(True)


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    """200 when /health/ready is (restored engines servable, not draining); 400 otherwise."""
    return _empty(not_ready_reason(get_state(request)) is None)


# -- models -------------------------------------------------------------------


@model_router.get("")
@model_router.get("/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    """Name, ready versions, platform, and the inputs and outputs with v2 datatypes
    and shapes (-1 for dynamic dimensions, the batch dimension included)."""
    return JSONResponse(metadata_of(get_state(request).registry, name, version))


def metadata_of(registry: Registry, name: str, version: str | None) -> dict[str, Any]:
    """A ready model's (or version's) metadata, as HTTP and gRPC answer it."""
    found = ready_version(registry, name, version)
    assert found.signature is not None
    versions = [str(found.version)] if version is not None else ready_versions(registry, name)

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)} for s in specs]

    return {
        "name": name,
        "versions": versions,
        "platform": _PLATFORMS.get(_backend(found), _backend(found)),
        "inputs": tensors(found.signature.inputs),
        "outputs": tensors(found.signature.outputs),
    }


@model_router.get("/ready")
@model_router.get("/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    """200 when the model (or that version) can serve now; 400 otherwise, unknown
    models included, as Triton answers."""
    registry = get_state(request).registry
    try:
        ready_version(registry, name, version)
    except ServiceError:  # unknown, not ready, or a malformed version: all "not ready"
        return _empty(False)
    return _empty(True)


@model_router.get("/config")
@model_router.get("/versions/{version}/config")
async def model_config(request: Request, name: str, version: str | None = None) -> Response:
    """The Triton model configuration fields that tritonclient and perf_analyzer
    read. For batching models ``dims`` leave out the batch dimension and
    ``max_batch_size`` is positive; unbatched models report 0."""
    found = ready_version(get_state(request).registry, name, version)
    return JSONResponse(triton_config(found))


def triton_config(found: EngineVersion) -> dict[str, Any]:
    """A ready version's configuration as Triton's protobuf-JSON (int64 as numbers)."""
    signature = found.signature
    assert signature is not None and found.batcher is not None
    batching = found.batcher.config
    skip = 1 if signature.batchable else 0

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "data_type": config_type_of(s.dtype), "dims": list(s.shape[skip:])}
            for s in specs
        ]

    backend = _backend(found)
    config: dict[str, Any] = {
        "name": found.name,
        "platform": _PLATFORMS.get(backend, backend),
        "backend": backend,
        "max_batch_size": batching.max_batch_size if signature.batchable else 0,
        "input": tensors(signature.inputs),
        "output": tensors(signature.outputs),
    }
    if signature.batchable:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": round(batching.max_queue_delay_ms * 1000),
        }
    config["instance_group"] = [
        {"count": batching.instances, "kind": "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"}
    ]
    return config


# -- statistics -----------------------------------------------------------------


@router.get("/models/stats", dependencies=[Depends(require_predict_key)])
async def all_statistics(request: Request) -> Response:
    """Statistics of every ready version (Triton's statistics extension)."""
    return JSONResponse({"model_stats": statistics_of(get_state(request), None, None)})


@model_router.get("/stats")
@model_router.get("/versions/{version}/stats")
async def model_statistics(request: Request, name: str, version: str | None = None) -> Response:
    """``{"model_stats": [...]}``: inference and execution counts, success, fail,
    queue and compute durations (count and total ns), and runs per batch size,
    read from the same counters as ``/metrics``."""
    return JSONResponse({"model_stats": statistics_of(get_state(request), name, version)})


def statistics_of(state: AppState, name: str | None, version: str | None) -> list[dict[str, Any]]:
    """Statistics of one model's ready versions (or the one named), or of every
    model's when ``name`` is None. An unknown model or version is ``NotFound``."""
    registry = state.registry
    if name is None:
        chosen = [v for v in registry.all_versions() if v.servable]
    elif version is None:
        ready_version(registry, name, None)  # 404 for an unknown model, 503 for one not ready
        chosen = [v for v in registry.versions(name) if v.servable]
    else:
        chosen = [ready_version(registry, name, version)]
    return [state.metrics.statistics(v.name, v.version) for v in chosen]


# -- inference ----------------------------------------------------------------


@model_router.post("/infer")
@model_router.post("/versions/{version}/infer")
async def model_infer(name: str, version: str | None = None) -> Response:
    """Run one inference request: JSON tensors or the binary tensor data extension,
    in and out. ``parameters.timeout`` (µs) is the request's deadline and
    ``parameters.priority`` its level (1 the highest), Triton's schedule policy.

    Declared here for the OpenAPI schema only: ``FastPathApp`` answers this path
    with ``infer_v2`` before routing, so this handler never runs."""
    raise AssertionError("POST /v2/models/{name}/infer is answered by FastPathApp")


async def infer_v2(
    state: AppState,
    name: str,
    version: str | None,
    read: Callable[[], Awaitable[Body]],
    *,
    headers: HeaderLookup,
    disconnected: Callable[[], Awaitable[None]] | None,
) -> tuple[bytes, dict[str, str]]:
    """Run one v2 infer request; returns the response body and headers. The model
    is known from the path, so a request its engine would refuse anyway is refused
    before its body is read (``read``).

    Raises the errors of ``service.errors.MAPPED_ERRORS`` for every refusal."""
    settings = state.settings
    with counted(state, "v2") as record:
        if settings.protect_predict:
            check_key(headers, state.api_keys)
        check_intake(state)
        found = ready_version(state.registry, name, version)
        signature = record.admit(found)
        body = await read()
        with tracing.span("decode"):
            encoding = content_encoding(headers("content-encoding"))
            if encoding is not None:
                inflate = functools.partial(decompress_body, body, encoding, settings.max_request_bytes)
                body = (
                    await state.offload.in_thread(inflate) if len(body) > INFLATE_INLINE_BYTES else inflate()
                )
            header_length = headers(INFERENCE_HEADER.lower())
            limits = {
                "max_json_depth": settings.max_json_depth,
                "max_tensor_elements": settings.max_tensor_elements,
            }
            json_bytes = parse_header_length(header_length, len(body))
            if (len(body) if json_bytes is None else json_bytes) > LARGE_BODY_BYTES:
                # A big JSON header is parsed in a worker process: orjson holds the GIL.
                parsed = await state.offload.in_process(
                    parse_big_request,
                    body,
                    header_length,
                    signature,
                    settings.max_json_depth,
                    settings.max_tensor_elements,
                )
                record.admit(found, header=(parsed.priority, parsed.timeout_ms))
            else:
                header = read_header(body, header_length, **limits)
                record.admit(found, header=(header.priority, header.timeout_ms))
                parsed = decode_request(header, signature, max_tensor_elements=settings.max_tensor_elements)
        outputs = await infer(
            found,
            parsed.feeds,
            timeout_ms=parsed.timeout_ms,
            priority=parsed.priority,
            disconnected=disconnected,
        )
        with tracing.span("encode"):
            return encode_infer_response(
                outputs,
                parsed.outputs,
                model_name=name,
                model_version=str(found.version),
                request_id=parsed.request_id,
            )


router.include_router(model_router)
