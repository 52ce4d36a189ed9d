"""The HTTP API through the ASGI app (TestClient runs the lifespan; builds run in
real child processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import upload, wait_for_state
from tests.models import reference_outputs


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("api-store")
    settings = Settings(store=store, backend="onnxruntime", max_batch_size=8, max_queue_delay_ms=2)
    with TestClient(create_app(settings)) as test_client:
        for name, path in model_files.items():
            upload(test_client, path, name)
        for name in model_files:
            status = wait_for_state(test_client, name)
            assert status["state"] == "ready", status
        yield test_client


def predict(client: TestClient, engine: str, inputs: object, **extra: object):
    return client.post("/predict", json={"engine": engine, "inputs": inputs, **extra})


def random_feeds(name: str, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    if name == "mlp":
        return {"x": rng.standard_normal((batch, 16)).astype(np.float32)}
    if name == "cnn":
        return {"image": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    if name == "two_in_two_out":
        return {k: rng.standard_normal((batch, 4)).astype(np.float32) for k in ("a", "b")}
    if name == "int64_embedding":
        return {"ids": rng.integers(0, 50, (batch, 5)).astype(np.int64)}
    return {"x": rng.standard_normal((1, 6)).astype(np.float32)}


@pytest.mark.parametrize("name", ["mlp", "cnn", "two_in_two_out", "int64_embedding", "fixed_batch_one"])
def test_predictions_equal_onnxruntime_on_the_original_model(
    client: TestClient, model_files: dict[str, Path], name: str
) -> None:
    for batch in (1, 3) if name != "fixed_batch_one" else (1,):
        feeds = random_feeds(name, batch)
        response = predict(client, name, {k: v.tolist() for k, v in feeds.items()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["engine"] == name and body["version"] == 1
        want = reference_outputs(model_files[name], feeds)
        assert body["outputs"].keys() == want.keys()
        for key, expected in want.items():
            got = np.asarray(body["outputs"][key], dtype=np.float32)
            assert np.max(np.abs(got - expected)) <= 1e-5


def test_single_input_engine_takes_the_nested_list_itself(client: TestClient) -> None:
    x = [[0.5] * 16]
    direct = predict(client, "mlp", x)
    keyed = predict(client, "mlp", {"x": x})
    assert direct.status_code == 200
    assert direct.json()["outputs"] == keyed.json()["outputs"]


def test_status_report(client: TestClient) -> None:
    status = client.get("/engines/mlp").json()
    assert status["state"] == "ready" and status["phase"] is None and status["progress"] == 1.0
    assert status["versions"] == [
        {"name": "mlp", "version": 1, "state": "ready", "url": "/engines/mlp/versions/1"}
    ]
    report = status["report"]
    assert report["backend"] == "onnxruntime"
    assert report["signature"]["batchable"] is True
    assert report["fusion"]["nodes_after"] < report["fusion"]["nodes_before"]
    assert "timings_s" in report and "latency_ms" in report
    assert client.get("/engines/mlp/versions/1").json()["version"] == 1


def test_unbatched_engine_says_so(client: TestClient) -> None:
    report = client.get("/engines/fixed_batch_one").json()["report"]
    assert report["signature"]["batchable"] is False
    assert "fixed first dimension" in report["signature"]["unbatched_reason"]
    response = predict(client, "fixed_batch_one", [[0.0] * 6, [0.0] * 6])
    assert response.status_code == 400
    assert "dimension 0 must be 1" in response.json()["error"]["message"]


def test_list_engines(client: TestClient) -> None:
    engines = client.get("/engines").json()["engines"]
    assert {e["name"] for e in engines} >= {"mlp", "cnn", "two_in_two_out"}


def test_integer_inputs_refuse_fractions_and_out_of_range(client: TestClient) -> None:
    ok = predict(client, "int64_embedding", {"ids": [[1.0, 2, 3, 4, 5]]})
    assert ok.status_code == 200
    fraction = predict(client, "int64_embedding", {"ids": [[1.5, 2, 3, 4, 5]]})
    assert fraction.status_code == 400 and "non-integral" in fraction.json()["error"]["message"]
    huge = predict(client, "int64_embedding", {"ids": [[2**70, 2, 3, 4, 5]]})
    assert huge.status_code == 400


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"engine": "nope", "inputs": [[1.0]]}, 404, "no engine named 'nope'"),
        ({"engine": "mlp", "version": 9, "inputs": [[1.0]]}, 404, "no version 9"),
        ({"engine": "mlp", "inputs": {"z": [[1.0] * 16]}}, 400, "unknown input"),
        ({"engine": "mlp", "inputs": {"x": [[1.0] * 15]}}, 400, "dimension 1 must be 16"),
        ({"engine": "mlp", "inputs": {"x": [["a"] * 16]}}, 400, "only numbers"),
        ({"engine": "mlp", "inputs": {"x": [[1.0] * 16, [1.0]]}}, 400, "rectangular"),
        ({"engine": "mlp", "inputs": {"x": [[1e300] * 16]}}, 400, "too large for float32"),
        ({"engine": "mlp"}, 400, "'inputs' is required"),
        ({"inputs": [[1.0]]}, 400, "'engine'"),
        ({"engine": "mlp", "version": "one", "inputs": [[1.0]]}, 400, "'version'"),
        ({"engine": "two_in_two_out", "inputs": [[1.0] * 4]}, 400, "keyed by input name"),
        ({"engine": "two_in_two_out", "inputs": {"a": [[1.0] * 4]}}, 400, "missing input"),
        ({"engine": "mlp", "inputs": {"x": []}}, 400, "has rank 1"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(
    client: TestClient, body: dict, status: int, message: str
) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_non_json_body(client: TestClient) -> None:
    response = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("data", "files", "status", "message"),
    [
        (
            {"name": "x"},
            {"model": ("m.onnx", b"garbage", "application/octet-stream")},
            400,
            "not an ONNX model",
        ),
        ({}, "mlp", 400, "'name'"),
        ({"name": "bad/name"}, "mlp", 400, "engine names"),
        ({"name": "x" * 65}, "mlp", 400, "engine names"),
        ({"name": "x", "max_batch_size": "zero"}, "mlp", 400, "max_batch_size"),
        ({"name": "x", "colour": "blue"}, "mlp", 400, "unknown form field"),
        ({"name": "x", "precision": "fp8"}, "mlp", 400, "precision"),
        ({"name": "x", "precision": "int8"}, "mlp", 400, "calibration"),
        ({"name": "x"}, None, 400, "'model' file"),
        ({"name": "x"}, {"other": ("o.txt", b"x", "text/plain")}, 400, "unexpected file field"),
    ],
)
def test_bad_uploads_get_a_4xx_naming_the_problem(
    client: TestClient, model_files: dict[str, Path], data: dict, files: object, status: int, message: str
) -> None:
    if files == "mlp":
        files = {"model": ("mlp.onnx", model_files["mlp"].read_bytes(), "application/octet-stream")}
    elif files is None:
        files = {"calibration": ("c.npz", b"x", "application/octet-stream")}
    response = client.post("/engines", data=data, files=files)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_upload_must_be_multipart(client: TestClient) -> None:
    response = client.post("/engines", json={"name": "x"})
    assert response.status_code == 415


def test_versions_cache_not_ready_and_delete(client: TestClient, model_files: dict[str, Path]) -> None:
    first = upload(client, model_files["mlp"], "versions")
    assert first == {
        "name": "versions",
        "version": 1,
        "state": "building",
        "url": "/engines/versions/versions/1",
    }
    # Still building: asking for that version by number is a conflict that names the state.
    early = predict(client, "versions", [[0.0] * 16], version=1)
    if early.status_code != 200:
        assert early.status_code == 409
        assert "building" in early.json()["error"]["message"] or "loading" in early.json()["error"]["message"]
    wait_for_state(client, "versions", 1)
    # The same bytes and options again: version 2 reuses the cached engine.
    second = upload(client, model_files["mlp"], "versions")
    assert second["version"] == 2
    status = wait_for_state(client, "versions", 2)
    assert status["state"] == "ready"
    assert (
        status["report"]["cache_key"]
        == client.get("/engines/versions/versions/1").json()["report"]["cache_key"]
    )
    metrics = client.get("/metrics").text
    assert 'kiln_engine_builds_total{result="cached"}' in metrics
    # Without a version, the newest ready version answers.
    assert predict(client, "versions", [[0.0] * 16]).json()["version"] == 2
    assert client.delete("/engines/versions/versions/2").status_code == 200
    assert predict(client, "versions", [[0.0] * 16]).json()["version"] == 1
    assert client.delete("/engines/versions").json() == {"name": "versions", "deleted_versions": [1]}
    assert client.get("/engines/versions").status_code == 404
    assert predict(client, "versions", [[0.0] * 16]).status_code == 404


def test_delete_during_a_build_then_upload_again(client: TestClient, model_files: dict[str, Path]) -> None:
    """The first build is cancelled; the second, of the same name, is a build of its
    own (numbered 2: a number is never given twice) and ends ready."""
    model = model_files["cnn"]
    assert upload(client, model, "again", max_batch_size="3")["version"] == 1
    assert client.delete("/engines/again").json() == {"name": "again", "deleted_versions": [1]}
    assert upload(client, model, "again", max_batch_size="3")["version"] == 2
    status = wait_for_state(client, "again", 2)
    assert status["state"] == "ready", status["error"]
    assert client.delete("/engines/again").status_code == 200


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_latency_target_makes_the_batcher_adaptive(client: TestClient, model_files: dict[str, Path]) -> None:
    upload(client, model_files["mlp"], "adaptive", latency_target_ms="20")
    status = wait_for_state(client, "adaptive")
    assert status["batching"]["latency_target_ms"] == 20
    assert status["adaptive"] == {"delay_ms": 0.0, "batch_cap": 8}
    assert predict(client, "adaptive", [[0.0] * 16]).status_code == 200
    assert 'kiln_batch_delay_seconds{engine="adaptive",version="1"}' in client.get("/metrics").text
    assert client.get("/engines/mlp").json()["adaptive"] is None
