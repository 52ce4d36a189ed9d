"""Triton's own HTTP client against a real ``kiln serve`` process (KServe v2)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess
from tests.models import reference_outputs

pytestmark = pytest.mark.slow

# "batched" is the MLP with a queue delay, so concurrent requests share runs.
ENGINES = {
    "mlp": ("mlp", {}),
    "pair": ("two_in_two_out", {}),
    "ids": ("int64_embedding", {}),
    "batched": ("mlp", {"max_batch_size": "16", "max_queue_delay_ms": "20"}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("triton") / "store").start()
    try:
        with process.client() as http:
            for name, (model, fields) in ENGINES.items():
                upload(http, model_files[model], name, **fields)
            for name in ENGINES:
                assert wait_for_state(http, name)["state"] == "ready"
        yield process
    finally:
        # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean exit.
        assert process.stop() in (0, -signal.SIGTERM), process.log.read_text()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=16)
    yield triton_client
    triton_client.close()


def inputs_of(feeds: dict[str, np.ndarray], *, binary: bool = True) -> list[triton.InferInput]:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    made = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), datatypes[array.dtype])
        tensor.set_data_from_numpy(array, binary_data=binary)
        made.append(tensor)
    return made


def batches_run(server: ServerProcess, engine: str) -> float:
    with server.client() as http:
        text = http.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "kiln_batches_total" and sample.labels.get("engine") == engine
    )


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "kiln"
    assert "binary_tensor_data" in metadata["extensions"]
    assert "statistics" in metadata["extensions"]
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("nope")

    model = client.get_model_metadata("pair")
    assert model["versions"] == ["1"]
    assert model["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in model["inputs"]] == [
        ("a", "FP32", [-1, 4]),
        ("b", "FP32", [-1, 4]),
    ]
    config = client.get_model_config("batched")
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [16]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20_000


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnxruntime(
    client: triton.InferenceServerClient, model_files: dict[str, Path], binary: bool
) -> None:
    rng = np.random.default_rng(3)
    cases = {
        "mlp": ("mlp", {"x": rng.standard_normal((3, 16)).astype(np.float32)}),
        "pair": (
            "two_in_two_out",
            {k: rng.standard_normal((2, 4)).astype(np.float32) for k in ("a", "b")},
        ),
        "ids": ("int64_embedding", {"ids": rng.integers(0, 50, (4, 5)).astype(np.int64)}),
    }
    for engine, (model, feeds) in cases.items():
        want = reference_outputs(model_files[model], feeds)
        outputs = None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in want]
        result = client.infer(
            engine, inputs_of(feeds, binary=binary), outputs=outputs, request_id=f"{engine}-1"
        )
        response = result.get_response()
        assert response["model_name"] == engine
        assert response["model_version"] == "1"
        assert response["id"] == f"{engine}-1"
        for name, expected in want.items():
            got = result.as_numpy(name)
            assert got is not None and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-5)


def test_output_subset_and_timeout(
    client: triton.InferenceServerClient, model_files: dict[str, Path]
) -> None:
    feeds = {k: np.full((1, 4), v, np.float32) for k, v in (("a", 2.0), ("b", 3.0))}
    result = client.infer(
        "pair",
        inputs_of(feeds),
        outputs=[triton.InferRequestedOutput("sum")],
        timeout=2_000_000,
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["sum"]
    assert result.as_numpy("prod") is None
    np.testing.assert_allclose(result.as_numpy("sum"), np.full((1, 4), 5.0))


def test_concurrent_async_requests_are_batched(
    client: triton.InferenceServerClient,
    server: ServerProcess,
    model_files: dict[str, Path],
) -> None:
    rng = np.random.default_rng(4)
    feeds = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(64)]
    before = batches_run(server, "batched")

    pending = [client.async_infer("batched", inputs_of({"x": x})) for x in feeds]
    results = [request.get_result() for request in pending]

    for x, result in zip(feeds, results, strict=True):
        want = reference_outputs(model_files["mlp"], {"x": x})["y"]
        np.testing.assert_allclose(result.as_numpy("y"), want, atol=1e-5)
    batches = batches_run(server, "batched") - before
    assert 1 <= batches < len(feeds), f"{len(feeds)} requests ran in {batches} batches"


def test_errors_raise_inference_server_exception(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 16), np.float32)
    with pytest.raises(InferenceServerException, match="no engine named 'nope'") as unknown:
        client.infer("nope", inputs_of({"x": x}))
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no engine named 'nope'"):
        client.get_model_metadata("nope")

    wrong_type = triton.InferInput("x", [1, 16], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    with pytest.raises(InferenceServerException, match="datatype FP64; the model expects FP32") as bad:
        client.infer("mlp", [wrong_type])
    assert bad.value.status() == "400"

    with pytest.raises(InferenceServerException, match="dimension 1 must be 16"):
        client.infer("mlp", inputs_of({"x": np.zeros((1, 15), np.float32)}))
    with pytest.raises(InferenceServerException, match="unknown output 'z'"):
        client.infer("mlp", inputs_of({"x": x}), outputs=[triton.InferRequestedOutput("z")])


def test_timeout_parameter_bounds_the_time_in_the_queue(
    client: triton.InferenceServerClient,
) -> None:
    # "batched" holds a lone request for 20 ms hoping for company; 1 µs expires it first.
    x = np.zeros((1, 16), np.float32)
    with pytest.raises(InferenceServerException, match="deadline passed") as expired:
        client.infer("batched", inputs_of({"x": x}), timeout=1)
    assert expired.value.status() == "504"
    assert client.infer("batched", inputs_of({"x": x}), timeout=5_000_000).as_numpy("y") is not None


def test_compressed_requests(client: triton.InferenceServerClient, model_files: dict[str, Path]) -> None:
    x = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    want = reference_outputs(model_files["mlp"], {"x": x})["y"]
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "mlp",
            inputs_of({"x": x}),
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(result.as_numpy("y"), want, atol=1e-5)
