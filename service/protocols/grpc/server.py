"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService`` and the
standard ``grpc.health.v1.Health`` service, on ``grpcio``'s asyncio server.

The server runs on the HTTP server's event loop and shares everything with the
REST endpoints: registry, batchers, limits, API keys (``authorization: Bearer``
or ``x-api-key`` metadata), request ids (``x-request-id`` metadata, returned in
the trailing metadata), metrics (``protocol="grpc"``) and tracing.

Errors end the call with Triton's status codes (``STATUS_CODES``); UNAVAILABLE
carries ``google.rpc.RetryInfo`` and a ``retry-after`` trailer. Health answers
SERVING only while the app is ready and not draining.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import tracing
from service.auth import check_key
from service.errors import MAPPED_ERRORS, ServiceError, retry_after_s, status_of
from service.health import not_ready_reason
from service.protocols.grpc import codec
from service.protocols.grpc.stubs import messages, services
from service.protocols.inference import check_intake, counted, infer
from service.protocols.kserve import (
    EXTENSIONS,
    metadata_of,
    ready_version,
    server_version,
    statistics_of,
    triton_config,
)
from service.request_id import adopt_request_id, sane_request_id
from service.state import AppState

log = logging.getLogger("kiln.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"

# HTTP status of kiln's errors → gRPC status, as Triton maps its own errors.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.UNAVAILABLE,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


class _Metadata:
    """``lookup("name")`` over a call's invocation metadata (keys are lower case)."""

    __slots__ = ("_items",)

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._items = context.invocation_metadata() or ()

    def __call__(self, name: str) -> str | None:
        for key, value in self._items:
            if key == name:
                return value if isinstance(value, str) else None
        return None


def _rpc(*, protected: bool) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Wraps a method: request id, tracing, the API key (``protected`` methods,
    when ``KILN_PROTECT_PREDICT`` is on), and errors mapped to status codes."""

    def wrap(method: Handler[Request, Response]) -> Handler[Request, Response]:
        name = f"/{SERVICE_NAME}/{method.__name__}"

        @functools.wraps(method)
        async def call(
            self: InferenceService, request: Request, context: grpc.aio.ServicerContext
        ) -> Response:
            metadata = _Metadata(context)
            raw_id = metadata("x-request-id")
            request_id = adopt_request_id(sane_request_id(raw_id.encode()) if raw_id else None)
            trailers: list[tuple[str, str]] = [("x-request-id", request_id)]
            with tracing.request_span(name, metadata) as trace_headers:
                trailers.extend(trace_headers.items())
                try:
                    if protected and self.state.settings.protect_predict:
                        check_key(metadata, self.state.api_keys)
                    response = await method(self, request, context)
                except MAPPED_ERRORS as exc:
                    await _abort(context, exc, trailers)
                    raise AssertionError("unreachable: abort raises") from None
                except Exception:
                    log.exception("unhandled error on %s", name)
                    context.set_trailing_metadata(trailers)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
                    raise AssertionError("unreachable: abort raises") from None
            context.set_trailing_metadata(trailers)
            return response

        return call

    return wrap


async def _abort(
    context: grpc.aio.ServicerContext, exc: BaseException, trailers: list[tuple[str, str]]
) -> None:
    status, _kind, message, headers = status_of(exc)
    code = STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)
    metadata: list[tuple[str, str | bytes]] = list(trailers)
    retry_after = headers.get("Retry-After")
    if retry_after is not None:
        metadata.append(("retry-after", retry_after))
        delay = Duration()
        delay.FromNanoseconds(round((retry_after_s(exc) or float(retry_after)) * 1e9))
        detail = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
        detail.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        metadata.append(("grpc-status-details-bin", detail.SerializeToString()))
    await context.abort(code, message, tuple(metadata))


class InferenceService(services.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the app's state (shared-memory,
    repository, trace and log settings RPCs answer UNIMPLEMENTED)."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    @_rpc(protected=False)
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerLiveResponse(live=True)

    @_rpc(protected=False)
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerReadyResponse(ready=_serving(self.state))

    @_rpc(protected=False)
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages.ServerMetadataResponse(name="kiln", version=server_version(), extensions=EXTENSIONS)

    @_rpc(protected=True)
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            ready_version(self.state.registry, request.name, request.version or None)
        except ServiceError:  # unknown, not ready, or a malformed version: all "not ready"
            return messages.ModelReadyResponse(ready=False)
        return messages.ModelReadyResponse(ready=True)

    @_rpc(protected=True)
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = metadata_of(self.state.registry, request.name, request.version or None)
        return json_format.ParseDict(metadata, messages.ModelMetadataResponse())

    @_rpc(protected=True)
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = ready_version(self.state.registry, request.name, request.version or None)
        return json_format.ParseDict({"config": triton_config(found)}, messages.ModelConfigResponse())

    @_rpc(protected=True)
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stats = statistics_of(self.state, request.name or None, request.version or None)
        return json_format.ParseDict({"model_stats": stats}, messages.ModelStatisticsResponse())

    @_rpc(protected=True)
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """One response per request, in order; a failed request answers its error
        in ``error_message`` and the stream goes on, as Triton's stream does."""
        metadata = _Metadata(context)
        if self.state.settings.protect_predict:
            try:
                check_key(metadata, self.state.api_keys)
            except ServiceError as exc:
                await _abort(context, exc, [])
        async for request in requests:
            adopt_request_id(None)
            try:
                response = await self._infer(request, None)
            except MAPPED_ERRORS as exc:
                yield messages.ModelStreamInferResponse(error_message=status_of(exc)[2])
                continue
            yield messages.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: Any, deadline_s: float | None) -> Any:
        state = self.state
        settings = state.settings
        with counted(state, "grpc") as record:
            check_intake(state)
            found = ready_version(state.registry, request.model_name, request.model_version or None)
            codec.check_parameters(request)
            timeout_ms, priority = codec.timeout_ms(request), codec.priority(request)
            if deadline_s is not None:  # the client's own gRPC deadline bounds the queue too
                timeout_ms = min(timeout_ms or deadline_s * 1000, deadline_s * 1000)
            signature = record.admit(found, header=(priority, timeout_ms))
            with tracing.span("decode"):
                feeds = codec.decode_inputs(request, signature, settings.max_tensor_elements)
                choices = codec.output_choices(request, signature)
            outputs = await infer(found, feeds, timeout_ms=timeout_ms, priority=priority)
            with tracing.span("encode"):
                return codec.encode_response(
                    outputs,
                    choices,
                    model_name=request.model_name,
                    model_version=str(found.version),
                    request_id=request.id,
                )


def _serving(state: AppState) -> bool:
    return not_ready_reason(state) is None


class HealthService(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: SERVING while the app is ready, for the whole
    server ("") and for the inference service; NOT_FOUND for other names."""

    WATCH_INTERVAL_S = 0.5

    def __init__(self, state: AppState) -> None:
        self.state = state

    def _status(self, service: str) -> Any:
        if service not in ("", SERVICE_NAME):
            return None
        serving = _serving(self.state)
        return (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self._status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self.WATCH_INTERVAL_S)


async def start_grpc_server(state: AppState) -> grpc.aio.Server:
    """Serve gRPC on ``KILN_HOST:KILN_GRPC_PORT`` on the running event loop.
    Raises ``OSError`` when the port cannot be bound."""
    settings = state.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    services.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(state), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
    await server.start()
    log.info("gRPC (KServe v2) on %s", address)
    return server
