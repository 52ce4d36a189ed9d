"""Triton's own gRPC client against a real ``kiln serve`` process (KServe v2 over gRPC)."""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, upload, wait_for_state
from tests.e2e.server import ServerProcess
from tests.models import reference_outputs

pytestmark = pytest.mark.slow

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}

# Every v2 datatype a kiln engine can take: one Identity input/output each.
DATATYPES = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
}

# "batched" is the MLP with a queue delay, so concurrent requests share runs.
ENGINES = {
    "mlp": ("mlp", {}),
    "pair": ("two_in_two_out", {}),
    "ids": ("int64_embedding", {}),
    "batched": ("mlp", {"max_batch_size": "16", "max_queue_delay_ms": "20"}),
    "types": ("identity_types", {}),
}


def identity_types(path: Path) -> Path:
    """in_<TYPE>[batch, 3] -> Identity -> out_<TYPE>, for every datatype above."""
    nodes, inputs, outputs = [], [], []
    for name, (onnx_type, _) in DATATYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", onnx_type, ["batch", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", onnx_type, ["batch", 3]))
    model = helper.make_model(
        helper.make_graph(nodes, "identity_types", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(model_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {**model_files, "identity_types": identity_types(tmp_path_factory.mktemp("grpc") / "types.onnx")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("triton-grpc") / "store",
        KILN_GRPC_PORT=str(free_port()),
        KILN_API_KEYS=KEY,
        KILN_PROTECT_PREDICT="true",
    ).start()
    try:
        with process.client(headers=AUTH) as http:
            for name, (model, fields) in ENGINES.items():
                upload(http, models[model], name, **fields)
            for name in ENGINES:
                assert wait_for_state(http, name)["state"] == "ready"
        yield process
    finally:
        assert process.stop() in (0, -signal.SIGTERM), process.log.read_text()


def grpc_address(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.env['KILN_GRPC_PORT']}"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(grpc_address(server))
    yield triton_client
    triton_client.close()


def inputs_of(
    feeds: dict[str, np.ndarray], datatypes: dict[str, str] | None = None
) -> list[triton.InferInput]:
    made = []
    for name, array in feeds.items():
        datatype = (datatypes or {}).get(name) or {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)  # raw_input_contents
        made.append(tensor)
    return made


def test_server_and_model_metadata_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready(headers=AUTH)
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "kiln"
    assert metadata["extensions"] == [
        "binary_tensor_data",
        "model_configuration",
        "schedule_policy",
        "statistics",
    ]
    assert client.is_model_ready("mlp", headers=AUTH)
    assert client.is_model_ready("mlp", "1", headers=AUTH)
    assert not client.is_model_ready("nope", headers=AUTH)
    assert not client.is_model_ready("mlp", "7", headers=AUTH)

    model = client.get_model_metadata("pair", headers=AUTH, as_json=True)
    assert model["versions"] == ["1"]
    assert model["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in model["inputs"]] == [
        ("a", "FP32", ["-1", "4"]),  # protobuf-JSON writes int64 as strings
        ("b", "FP32", ["-1", "4"]),
    ]
    config = client.get_model_config("batched", headers=AUTH).config
    assert config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", 11, [16])]  # TYPE_FP32
    assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert config.instance_group[0].kind == 2  # KIND_CPU


def test_raw_infer_of_every_datatype_equals_onnxruntime(
    client: triton.InferenceServerClient, models: dict[str, Path]
) -> None:
    rng = np.random.default_rng(7)
    feeds: dict[str, np.ndarray] = {}
    for name, (_, dtype) in DATATYPES.items():
        if dtype is np.bool_:
            feeds[f"in_{name}"] = rng.integers(0, 2, (2, 3)).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            feeds[f"in_{name}"] = np.array([[info.min, 0, info.max], [1, 2, 3]], dtype=dtype)
        else:
            feeds[f"in_{name}"] = rng.standard_normal((2, 3)).astype(dtype)
    datatypes = {f"in_{name}": name for name in DATATYPES}
    result = client.infer("types", inputs_of(feeds, datatypes), headers=AUTH)
    want = reference_outputs(models["identity_types"], feeds)
    for name in DATATYPES:
        got = result.as_numpy(f"out_{name}")
        assert got is not None and got.dtype == want[f"out_{name}"].dtype, name
        np.testing.assert_array_equal(got, want[f"out_{name}"])
        np.testing.assert_array_equal(got, feeds[f"in_{name}"])


def test_infer_equals_onnxruntime(client: triton.InferenceServerClient, models: dict[str, Path]) -> None:
    rng = np.random.default_rng(3)
    cases = {
        "mlp": ("mlp", {"x": rng.standard_normal((3, 16)).astype(np.float32)}),
        "pair": ("two_in_two_out", {k: rng.standard_normal((2, 4)).astype(np.float32) for k in "ab"}),
        "ids": ("int64_embedding", {"ids": rng.integers(0, 50, (4, 5)).astype(np.int64)}),
    }
    for engine, (model, feeds) in cases.items():
        want = reference_outputs(models[model], feeds)
        result = client.infer(engine, inputs_of(feeds), request_id=f"{engine}-1", headers=AUTH)
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == (engine, "1", f"{engine}-1")
        for name, expected in want.items():
            got = result.as_numpy(name)
            assert got is not None and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-5)
    # One output of two, by name.
    feeds = cases["pair"][1]
    result = client.infer(
        "pair", inputs_of(feeds), outputs=[triton.InferRequestedOutput("sum")], headers=AUTH
    )
    assert [o.name for o in result.get_response().outputs] == ["sum"]
    np.testing.assert_allclose(result.as_numpy("sum"), feeds["a"] + feeds["b"], atol=1e-6)


def test_concurrent_async_requests_are_batched(
    client: triton.InferenceServerClient, models: dict[str, Path]
) -> None:
    def counts() -> tuple[int, int]:
        (stats,) = client.get_inference_statistics("batched", headers=AUTH).model_stats
        return stats.inference_count, stats.execution_count

    rng = np.random.default_rng(4)
    feeds = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(64)]
    inferences_before, executions_before = counts()
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for index, x in enumerate(feeds):
        client.async_infer(
            "batched",
            inputs_of({"x": x}),
            lambda result, error, i=index: answers.put((i, result, error)),
            headers=AUTH,
        )
    results: dict[int, triton.InferResult] = {}
    for _ in feeds:
        index, result, error = answers.get(timeout=30)
        assert error is None, error
        results[index] = result
    for index, x in enumerate(feeds):
        result = results[index]
        want = reference_outputs(models["mlp"], {"x": x})["y"]
        np.testing.assert_allclose(result.as_numpy("y"), want, atol=1e-5)
    inferences_after, executions_after = counts()
    assert inferences_after - inferences_before == len(feeds)
    executions = executions_after - executions_before
    assert 1 <= executions < len(feeds), f"{len(feeds)} requests ran in {executions} batches"
    (stats,) = client.get_inference_statistics("batched", headers=AUTH).model_stats
    assert max(batch.batch_size for batch in stats.batch_stats) > 1
    assert sum(batch.compute_infer.count for batch in stats.batch_stats) == stats.execution_count


def test_errors_have_tritons_status_codes(
    server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    x = np.zeros((1, 16), np.float32)
    with pytest.raises(InferenceServerException, match="no engine named 'nope'") as unknown:
        client.infer("nope", inputs_of({"x": x}), headers=AUTH)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="dimension 1 must be 16") as shape:
        client.infer("mlp", inputs_of({"x": np.zeros((1, 15), np.float32)}), headers=AUTH)
    assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    wrong_type = triton.InferInput("x", [1, 16], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    with pytest.raises(InferenceServerException, match="datatype FP64; the model expects FP32") as dtype:
        client.infer("mlp", [wrong_type], headers=AUTH)
    assert dtype.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="needs an API key") as anonymous:
        client.infer("mlp", inputs_of({"x": x}))
    assert anonymous.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException, match="not valid") as wrong_key:
        client.infer("mlp", inputs_of({"x": x}), headers={"authorization": "Bearer nope"})
    assert wrong_key.value.status() == "StatusCode.PERMISSION_DENIED"
    with pytest.raises(InferenceServerException, match="deadline passed") as expired:
        client.infer("batched", inputs_of({"x": x}), timeout=1, headers=AUTH)  # 1 µs in the queue
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The request id comes back in the trailing metadata.
    channel = grpc.insecure_channel(grpc_address(server))
    stub = triton.service_pb2_grpc.GRPCInferenceServiceStub(channel)
    _, call = stub.ServerLive.with_call(
        triton.service_pb2.ServerLiveRequest(), metadata=[("x-request-id", "trace-me-1")]
    )
    assert ("x-request-id", "trace-me-1") in call.trailing_metadata()
    channel.close()


def test_statistics_match_over_grpc_and_http(
    server: ServerProcess, client: triton.InferenceServerClient
) -> None:
    x = np.ones((2, 16), np.float32)
    client.infer("mlp", inputs_of({"x": x}), headers=AUTH)
    grpc_stats = client.get_inference_statistics("mlp", headers=AUTH, as_json=True)["model_stats"][0]
    with server.client(headers=AUTH) as http:
        http_stats = http.get("/v2/models/mlp/stats").json()["model_stats"][0]
        every = http.get("/v2/models/stats").json()["model_stats"]
    assert {s["name"] for s in every} == set(ENGINES)
    # protobuf-JSON writes uint64 as strings and leaves zeros out.
    assert int(grpc_stats["inference_count"]) == http_stats["inference_count"] >= 2
    assert int(grpc_stats["execution_count"]) == http_stats["execution_count"] >= 1
    for field in ("success", "queue", "compute_infer"):
        assert (
            int(grpc_stats["inference_stats"][field]["count"])
            == http_stats["inference_stats"][field]["count"]
        )
        assert http_stats["inference_stats"][field]["ns"] > 0
    # A failed request counts as a failure.
    with pytest.raises(InferenceServerException):
        client.infer("mlp", inputs_of({"x": np.zeros((1, 15), np.float32)}), headers=AUTH)
    (after,) = client.get_inference_statistics("mlp", headers=AUTH).model_stats
    assert after.inference_stats.fail.count == http_stats["inference_stats"]["fail"]["count"] + 1


def test_health_service_answers_serving_when_ready(server: ServerProcess) -> None:
    with grpc.insecure_channel(grpc_address(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="other.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
