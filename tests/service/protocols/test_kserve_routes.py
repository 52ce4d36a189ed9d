"""KServe v2 routes through the ASGI app: metadata, config, readiness, infer and
Triton's error statuses (TestClient runs the lifespan; builds run in child processes)."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings
from tests import models
from tests.conftest import upload, wait_for_state
from tests.models import reference_outputs

ENGINES = ("mlp", "two_in_two_out", "int64_embedding", "fixed_batch_one")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[TestClient]:
    settings = Settings(
        store=tmp_path_factory.mktemp("kserve-store"),
        backend="onnxruntime",
        build_workers=4,
        max_batch_size=8,
        max_request_bytes=64 * 1024,
    )
    with TestClient(create_app(settings)) as test_client:
        for name in ENGINES:
            upload(test_client, model_files[name], name)
        for name in ENGINES:
            assert wait_for_state(test_client, name)["state"] == "ready"
        yield test_client


def binary_request(inputs: dict[str, tuple[str, np.ndarray]], **extra: Any) -> tuple[bytes, dict[str, str]]:
    """A body and headers as tritonclient sends them: binary inputs, no Content-Type."""
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, (datatype, array) in inputs.items()
        ],
        **extra,
    }
    json_bytes = orjson.dumps(header)
    body = json_bytes + b"".join(array.tobytes() for _, array in inputs.values())
    return body, {"Inference-Header-Content-Length": str(len(json_bytes))}


def binary_outputs(response: Any) -> dict[str, np.ndarray]:
    """Decode a response with binary outputs (as tritonclient does)."""
    length = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:length])
    arrays, offset = {}, length
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        chunk = response.content[offset : offset + size]
        arrays[output["name"]] = np.frombuffer(chunk, dtypes[output["datatype"]]).reshape(output["shape"])
        offset += size
    assert offset == len(response.content)
    return arrays


def v2_requests(client: TestClient, engine: str) -> float:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "kiln_requests_total"
        and sample.labels.get("engine") == engine
        and sample.labels.get("protocol") == "v2"
    )


# -- server -------------------------------------------------------------------


def test_server_metadata_lists_only_implemented_extensions(client: TestClient) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {
        "name": "kiln",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "model_configuration", "schedule_policy", "statistics"],
    }


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_health_answers_200_with_an_empty_body(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.content == b""


# -- model metadata, readiness and configuration ------------------------------


def test_model_metadata_of_a_batching_model(client: TestClient) -> None:
    response = client.get("/v2/models/two_in_two_out")
    assert response.status_code == 200
    assert response.json() == {
        "name": "two_in_two_out",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "b", "datatype": "FP32", "shape": [-1, 4]},
        ],
        "outputs": [
            {"name": "sum", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "prod", "datatype": "FP32", "shape": [-1, 4]},
        ],
    }
    assert client.get("/v2/models/int64_embedding/versions/1").json()["inputs"] == [
        {"name": "ids", "datatype": "INT64", "shape": [-1, 5]}
    ]


def test_model_config_of_a_batching_model_leaves_out_the_batch_dim(client: TestClient) -> None:
    response = client.get("/v2/models/mlp/config")
    assert response.status_code == 200
    assert response.json() == {
        "name": "mlp",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
        "dynamic_batching": {"preferred_batch_size": [], "max_queue_delay_microseconds": 0},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }


def test_unbatched_model_reports_max_batch_size_0_and_full_dims(client: TestClient) -> None:
    config = client.get("/v2/models/fixed_batch_one/versions/1/config").json()
    assert config["max_batch_size"] == 0
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [1, 6]}]
    assert "dynamic_batching" not in config
    metadata = client.get("/v2/models/fixed_batch_one").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 6]}]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/mlp/ready", 200),
        ("/v2/models/mlp/versions/1/ready", 200),
        ("/v2/models/mlp/versions/7/ready", 400),
        ("/v2/models/nope/ready", 400),
        ("/v2/models/mlp/versions/x/ready", 400),
    ],
)
def test_model_readiness_is_200_or_400_with_an_empty_body(client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert response.content == b""


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v2/models/nope", 404, "no engine named 'nope'"),
        ("/v2/models/mlp/versions/7", 404, "engine 'mlp' has no version 7"),
        ("/v2/models/mlp/versions/0/config", 400, "model versions are positive integers"),
        ("/v2/models/mlp/versions/%C2%B2", 400, "model versions are positive integers"),
        ("/v2/models/nope/config", 404, "no engine named 'nope'"),
    ],
)
def test_metadata_errors_use_tritons_statuses_and_error_body(
    client: TestClient, path: str, status: int, message: str
) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_a_model_still_building_is_unavailable(client: TestClient, tmp_path: Path) -> None:
    # New weights, so the upload builds instead of reusing the cached engine.
    upload(client, models.mlp(tmp_path / "late.onnx", seed=11), "late", progressive="false")
    for path in ("/v2/models/late", "/v2/models/late/config"):
        response = client.get(path)
        assert response.status_code == 503
        assert "no ready version" in response.json()["error"]
    assert client.get("/v2/models/late/ready").status_code == 400
    infer = client.post(
        "/v2/models/late/infer",
        json={"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]},
    )
    assert infer.status_code == 503
    assert wait_for_state(client, "late")["state"] == "ready"
    assert client.get("/v2/models/late/ready").status_code == 200


# -- inference ----------------------------------------------------------------


def test_json_infer_equals_onnxruntime(client: TestClient, model_files: dict[str, Path]) -> None:
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    before = v2_requests(client, "mlp")
    response = client.post(
        "/v2/models/mlp/infer",
        json={
            "id": "r1",
            "inputs": [{"name": "x", "shape": [3, 16], "datatype": "FP32", "data": x.tolist()}],
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("mlp", "1", "r1")
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("y", "FP32", [3, 4])
    want = reference_outputs(model_files["mlp"], {"x": x})["y"]
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(3, 4), want, atol=1e-5)
    assert v2_requests(client, "mlp") == before + 1


def test_binary_infer_with_an_output_subset(client: TestClient, model_files: dict[str, Path]) -> None:
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 4)).astype(np.float32) for _ in range(2))
    body, headers = binary_request(
        {"a": ("FP32", a), "b": ("FP32", b)},
        outputs=[{"name": "prod", "parameters": {"binary_data": True}}],
    )
    response = client.post("/v2/models/two_in_two_out/versions/1/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    outputs = binary_outputs(response)
    assert list(outputs) == ["prod"]
    want = reference_outputs(model_files["two_in_two_out"], {"a": a, "b": b})
    np.testing.assert_allclose(outputs["prod"], want["prod"], atol=1e-5)


def test_int64_inputs_binary_and_json(client: TestClient, model_files: dict[str, Path]) -> None:
    ids = np.random.default_rng(2).integers(0, 50, (4, 5)).astype(np.int64)
    want = reference_outputs(model_files["int64_embedding"], {"ids": ids})["pooled"]
    body, headers = binary_request({"ids": ("INT64", ids)}, parameters={"binary_data_output": True})
    binary = client.post("/v2/models/int64_embedding/infer", content=body, headers=headers)
    np.testing.assert_allclose(binary_outputs(binary)["pooled"], want, atol=1e-5)
    as_json = client.post(
        "/v2/models/int64_embedding/infer",
        json={
            "inputs": [{"name": "ids", "shape": [4, 5], "datatype": "INT64", "data": ids.ravel().tolist()}]
        },
    )
    np.testing.assert_allclose(
        np.asarray(as_json.json()["outputs"][0]["data"]).reshape(4, 8), want, atol=1e-5
    )


def test_raw_binary_and_gzip_bodies(client: TestClient, model_files: dict[str, Path]) -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    want = reference_outputs(model_files["mlp"], {"x": x.reshape(1, 16)})["y"]
    raw = client.post(
        "/v2/models/mlp/infer",
        content=x.tobytes(),
        headers={"Inference-Header-Content-Length": "0"},
    )
    assert raw.status_code == 200, raw.text
    np.testing.assert_allclose(binary_outputs(raw)["y"], want, atol=1e-5)

    body, headers = binary_request({"x": ("FP32", x.reshape(1, 16))})
    compressed = client.post(
        "/v2/models/mlp/infer",
        content=gzip.compress(body),
        headers={**headers, "Content-Encoding": "gzip"},
    )
    assert compressed.status_code == 200, compressed.text
    np.testing.assert_allclose(
        np.asarray(compressed.json()["outputs"][0]["data"]).reshape(1, 4), want, atol=1e-5
    )


def test_unbatched_model_infers_its_fixed_shape(client: TestClient, model_files: dict[str, Path]) -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 6) / 6
    body, headers = binary_request({"x": ("FP32", x)}, parameters={"binary_data_output": True})
    response = client.post("/v2/models/fixed_batch_one/infer", content=body, headers=headers)
    want = reference_outputs(model_files["fixed_batch_one"], {"x": x})["y"]
    np.testing.assert_allclose(binary_outputs(response)["y"], want, atol=1e-5)


def test_timeout_parameter_is_accepted(client: TestClient) -> None:
    response = client.post(
        "/v2/models/mlp/infer",
        json={
            "parameters": {"timeout": 5_000_000},
            "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
        },
    )
    assert response.status_code == 200, response.text


X16 = {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"inputs": [{**X16, "datatype": "FP64"}]}, "has datatype FP64; the model expects FP32"),
        ({"inputs": [{**X16, "datatype": "BYTES"}]}, "kiln engines take no strings"),
        ({"inputs": [{**X16, "shape": [1, 15], "data": [0.0] * 15}]}, "dimension 1 must be 16"),
        ({"inputs": [{**X16, "shape": [16], "data": [0.0] * 16}]}, "has rank 1"),
        ({"inputs": [{**X16, "shape": [0, 16], "data": []}]}, "no rows"),
        (
            {"inputs": [{**X16, "shape": [2, 16]}]},
            "has 16 elements but its shape \\[2, 16\\] needs 32",
        ),
        ({"inputs": [X16], "outputs": [{"name": "z"}]}, "unknown output 'z'"),
        ({"inputs": [{**X16, "name": "q"}]}, "unknown input 'q'"),
    ],
)
def test_bad_infer_requests_are_400_with_the_reason(
    client: TestClient, request_body: dict[str, Any], message: str
) -> None:
    response = client.post("/v2/models/mlp/infer", content=orjson.dumps(request_body))
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_malformed_binary_bodies_are_400(client: TestClient) -> None:
    body, headers = binary_request({"x": ("FP32", np.zeros((1, 16), np.float32))})
    too_long = {"Inference-Header-Content-Length": str(len(body) + 1)}
    assert client.post("/v2/models/mlp/infer", content=body, headers=too_long).status_code == 400
    short = client.post("/v2/models/mlp/infer", content=body[:-4], headers=headers)
    assert short.status_code == 400
    assert "needs 64 binary bytes" in short.json()["error"]
    extra = client.post("/v2/models/mlp/infer", content=body + b"\x00" * 4, headers=headers)
    assert extra.status_code == 400
    assert "add up to 64" in extra.json()["error"]


def test_unknown_model_infer_is_404(client: TestClient) -> None:
    response = client.post("/v2/models/nope/infer", json={"inputs": [X16]})
    assert response.status_code == 404
    assert response.json() == {"error": "no engine named 'nope'"}


def test_decompression_bomb_is_413(client: TestClient) -> None:
    bomb = gzip.compress(b" " * (1024 * 1024))
    response = client.post("/v2/models/mlp/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "decompressed request body is larger than the limit" in response.json()["error"]


# -- authentication and draining (a second app, no engines) -------------------


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        store=tmp_path / "store", backend="onnxruntime", api_keys=["k1"], protect_predict=True
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_model_endpoints_need_the_key_when_predictions_are_protected(protected: TestClient) -> None:
    assert protected.get("/v2").status_code == 200
    assert protected.get("/v2/health/ready").status_code == 200
    for method, path in [
        ("GET", "/v2/models/mlp"),
        ("GET", "/v2/models/mlp/config"),
        ("GET", "/v2/models/mlp/ready"),
        ("POST", "/v2/models/mlp/infer"),
    ]:
        response = protected.request(method, path)
        assert response.status_code == 401, path
        assert "API key" in response.json()["error"]
    keyed = protected.get("/v2/models/mlp", headers={"Authorization": "Bearer k1"})
    assert keyed.status_code == 404


def test_draining_server_is_not_ready_and_refuses_inference(protected: TestClient) -> None:
    state = protected.app.state.kiln  # type: ignore[attr-defined]
    state.draining = True
    try:
        assert protected.get("/v2/health/ready").status_code == 400
        assert protected.get("/v2/health/live").status_code == 200
        response = protected.post("/v2/models/mlp/infer", json={"inputs": [X16]}, headers={"X-API-Key": "k1"})
        assert response.status_code == 503
        assert response.json() == {"error": "the server is shutting down"}
    finally:
        state.draining = False
