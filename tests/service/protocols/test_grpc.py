"""The gRPC service in-process (the app's lifespan starts it on its own event loop):
typed contents, status codes and retry information, limits, health, and
OpenTelemetry spans for HTTP and gRPC requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from service.app import create_app
from service.logs import JsonFormatter
from service.protocols.grpc.server import HealthService
from service.protocols.grpc.stubs import messages, services
from service.settings import Settings
from tests.conftest import free_port, upload, wait_for_state
from tests.models import reference_outputs

ENGINES = {
    "mlp": ("mlp", {}),
    "ids": ("int64_embedding", {}),
    "slow": ("mlp", {"max_batch_size": "8", "max_queue_delay_ms": "100"}),
}
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[TestClient]:
    settings = Settings(
        store=tmp_path_factory.mktemp("grpc-store"),
        backend="onnxruntime",
        build_workers=3,
        grpc_port=free_port(),
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with TestClient(create_app(settings)) as client:
        for name, (model, fields) in ENGINES.items():
            upload(client, model_files[model], name, **fields)
        for name in ENGINES:
            assert wait_for_state(client, name)["state"] == "ready"
        yield client


@pytest.fixture(scope="module")
def stub(app: TestClient) -> Iterator[Any]:
    port = app.app.state.kiln.settings.grpc_port  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield services.GRPCInferenceServiceStub(channel)


def typed_request(model: str, name: str, datatype: str, shape: list[int], **contents: Any) -> Any:
    request = messages.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def raw_request(model: str, feeds: dict[str, tuple[str, np.ndarray]]) -> Any:
    request = messages.ModelInferRequest(model_name=model)
    for name, (datatype, array) in feeds.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def output(response: Any, index: int, dtype: type) -> np.ndarray:
    shape = tuple(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(shape)


def test_typed_contents_equal_onnxruntime(stub: Any, model_files: dict[str, Path]) -> None:
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    response = stub.ModelInfer(typed_request("mlp", "x", "FP32", [2, 16], fp32_contents=x.ravel()))
    want = reference_outputs(model_files["mlp"], {"x": x})["y"]
    assert (response.outputs[0].name, response.outputs[0].datatype) == ("y", "FP32")
    np.testing.assert_allclose(output(response, 0, np.float32), want, atol=1e-5)

    ids = np.array([[1, 2, 3, 4, 5]], np.int64)
    response = stub.ModelInfer(typed_request("ids", "ids", "INT64", [1, 5], int64_contents=ids.ravel()))
    want = reference_outputs(model_files["int64_embedding"], {"ids": ids})
    np.testing.assert_allclose(output(response, 0, np.float32), next(iter(want.values())), atol=1e-5)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            typed_request("mlp", "x", "FP32", [1, 16], fp32_contents=[0.0] * 15),
            "has 15 values in fp32_contents",
        ),
        (typed_request("mlp", "x", "FP16", [1, 16]), "datatype FP16; the model expects FP32"),
        (typed_request("mlp", "z", "FP32", [1, 16]), "unknown input 'z'; this model takes x"),
        (
            typed_request("ids", "ids", "INT64", [1, 2], fp32_contents=[1, 2]),
            "has 0 values in int64_contents",
        ),
        (
            typed_request("mlp", "x", "FP32", [0, 16], fp32_contents=[]),
            "the request has no rows",
        ),
        (messages.ModelInferRequest(model_name="mlp"), "the request has no inputs"),
    ],
)
def test_malformed_requests_are_invalid_argument(stub: Any, request_: Any, message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_stream_answers_each_request_in_order(stub: Any, model_files: dict[str, Path]) -> None:
    rows = [np.full((1, 16), v, np.float32) for v in (0.5, 1.5)]
    requests = [
        raw_request("mlp", {"x": ("FP32", rows[0])}),
        raw_request("mlp", {"x": ("FP32", np.zeros((1, 15), np.float32))}),
        raw_request("mlp", {"x": ("FP32", rows[1])}),
    ]
    answers = list(stub.ModelStreamInfer(iter(requests)))
    assert [a.error_message for a in answers][1].startswith("input 'x' has shape [1, 15]")
    for answer, x in zip((answers[0], answers[2]), rows, strict=True):
        assert answer.error_message == ""
        want = reference_outputs(model_files["mlp"], {"x": x})["y"]
        np.testing.assert_allclose(output(answer.infer_response, 0, np.float32), want, atol=1e-5)


def test_raw_and_typed_contents_do_not_mix(stub: Any) -> None:
    request = raw_request("mlp", {"x": ("FP32", np.zeros((1, 16), np.float32))})
    request.raw_input_contents.append(b"extra")
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 inputs but 2 raw_input_contents" in error.value.details()


def test_oversized_message_is_resource_exhausted(stub: Any) -> None:
    big = np.zeros((MAX_REQUEST_BYTES // 64 + 1, 16), np.float32)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(raw_request("mlp", {"x": ("FP32", big)}))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_draining_is_unavailable_with_retry_information(app: TestClient, stub: Any) -> None:
    state = app.app.state.kiln  # type: ignore[attr-defined]
    state.draining = True
    try:
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(raw_request("mlp", {"x": ("FP32", np.zeros((1, 16), np.float32))}))
    finally:
        state.draining = False
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(error.value.trailing_metadata())
    assert trailers["retry-after"] == "1"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.seconds == 1


async def test_health_follows_readiness() -> None:
    # The fields the one readiness rule (service.health.not_ready_reason) reads.
    manager = SimpleNamespace(restored=False, pending_restores=list)
    state = SimpleNamespace(draining=False, manager=manager, settings=SimpleNamespace(require_ready=[]))
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(state), server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
                return int(answer.status)

            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            manager.restored = True
            assert await status() == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            state.draining = True
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (
                await asyncio.wait_for(watch.read(), 5)
            ).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await server.stop(None)


# -- tracing -------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


def traceparent(trace_id: int, span_id: int = 0x1234) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def names_in_trace(exporter: InMemorySpanExporter, trace_id: int) -> set[str]:
    return {span.name for span in exporter.get_finished_spans() if span.context.trace_id == trace_id}


def test_http_and_grpc_requests_trace_request_queue_and_batch(
    app: TestClient, stub: Any, spans: InMemorySpanExporter
) -> None:
    http_trace, grpc_trace = 0xA1, 0xB2
    x = np.zeros((1, 16), np.float32)
    response = app.post(
        "/v2/models/mlp/infer",
        json={"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}]},
        headers={"traceparent": traceparent(http_trace)},
    )
    assert response.status_code == 200
    assert response.headers["traceparent"].startswith(f"00-{http_trace:032x}-")
    stub.ModelInfer(
        raw_request("mlp", {"x": ("FP32", x)}), metadata=[("traceparent", traceparent(grpc_trace))]
    )
    phases = {"decode", "queue", "batch", "encode"}
    assert names_in_trace(spans, http_trace) == {"/v2/models/mlp/infer", *phases}
    assert names_in_trace(spans, grpc_trace) == {"/inference.GRPCInferenceService/ModelInfer", *phases}
    request_span = next(s for s in spans.get_finished_spans() if s.name == "/v2/models/mlp/infer")
    assert request_span.parent is not None and request_span.parent.span_id == 0x1234


def test_a_batch_links_to_every_request_it_served(stub: Any, spans: InMemorySpanExporter) -> None:
    traces = [0xC0 + i for i in range(4)]
    x = np.zeros((1, 16), np.float32)

    def call(trace_id: int) -> Any:
        # "slow" waits 100 ms for company: the four requests share one run.
        return stub.ModelInfer(
            raw_request("slow", {"x": ("FP32", x)}), metadata=[("traceparent", traceparent(trace_id))]
        )

    with ThreadPoolExecutor(len(traces)) as pool:
        list(pool.map(call, traces))
    batches = [s for s in spans.get_finished_spans() if s.name == "batch"]
    linked = {link.context.trace_id for batch in batches for link in batch.links}
    assert linked == set(traces)
    assert any(len(batch.links) > 1 for batch in batches), [len(b.links) for b in batches]
    for trace_id in traces:
        assert {"queue", "/inference.GRPCInferenceService/ModelInfer"} <= names_in_trace(spans, trace_id)


def test_json_logs_carry_the_trace_id(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("kiln", logging.INFO, __file__, 1, "inside a request", None, None)
    with tracing.span("request") as span:
        entry = orjson.loads(JsonFormatter().format(record))
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    tracing.disable()
    assert "trace_id" not in orjson.loads(JsonFormatter().format(record))


def test_tracing_is_off_by_default(app: TestClient) -> None:
    assert not tracing.enabled()
    response = app.post(
        "/v2/models/mlp/infer",
        json={"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]},
        headers={"traceparent": traceparent(0xD1)},
    )
    assert response.status_code == 200 and "traceparent" not in response.headers


def test_an_upload_traces_its_build_phases(
    app: TestClient, spans: InMemorySpanExporter, model_files: dict[str, Path]
) -> None:
    trace_id = 0xE1
    response = app.post(
        "/engines",
        files={"model": ("mlp.onnx", model_files["mlp"].read_bytes())},
        # A batch limit no other engine here has: a new cache key, so a build runs.
        data={"name": "traced", "progressive": "false", "max_batch_size": "5"},
        headers={"traceparent": traceparent(trace_id)},
    )
    assert response.status_code == 202
    assert response.headers["traceparent"].startswith(f"00-{trace_id:032x}-")
    assert wait_for_state(app, "traced")["state"] == "ready"
    finished = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    upload_span = next(s for s in finished if s.name == "POST /engines")
    build = next(s for s in finished if s.name == "build" and s.attributes.get("kiln.engine") == "traced")
    assert build.parent is not None and build.parent.span_id == upload_span.context.span_id
    phases = [s.name for s in finished if s.parent is not None and s.parent.span_id == build.context.span_id]
    assert {"validate", "accuracy"} <= set(phases), phases
