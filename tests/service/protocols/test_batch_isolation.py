"""What one request does to the others in its batch, and requests bigger than a batch:
through the whole app, on real ONNX Runtime engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from tests.models import int64_embedding, mlp, reference_outputs


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = Settings(_env_file=None, store=tmp_path / "store", backend="onnxruntime", grpc_port=0)  # type: ignore[call-arg]
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def ready(client: httpx.AsyncClient, model: Path, name: str, **fields: str) -> None:
    files = {"model": (model.name, model.read_bytes(), "application/octet-stream")}
    response = await client.post(
        "/engines", files=files, data={"name": name, "progressive": "false", **fields}
    )
    assert response.status_code == 202, response.text
    for _ in range(600):
        state = (await client.get(f"/engines/{name}")).json()["state"]
        if state in ("ready", "failed"):
            assert state == "ready"
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not become ready")


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_one_malformed_request_in_a_batch_fails_alone(app: FastAPI, tmp_path: Path) -> None:
    model = int64_embedding(tmp_path / "emb.onnx", vocab=50)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kiln") as client:
        # A long queue delay gathers the eight requests into one batch.
        await ready(client, model, "emb", max_batch_size="8", max_queue_delay_ms="2000")
        ids = [np.arange(i, i + 5).reshape(1, 5) for i in range(8)]
        ids[3] = np.array([[1, 2, 500, 4, 5]])  # valid shape and dtype; index 500 is past the table's 50 rows
        responses = await asyncio.gather(
            *(client.post("/predict", json={"engine": "emb", "inputs": {"ids": x.tolist()}}) for x in ids)
        )
        text = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200, 200, 200]
    error = responses[3].json()["error"]
    assert error["type"] == "invalid_input"
    assert "Gather" in error["message"] and "500" in error["message"], error
    print(error["message"])
    for i, response in enumerate(responses):
        if i != 3:
            want = reference_outputs(model, {"ids": ids[i].astype(np.int64)})["pooled"]
            np.testing.assert_allclose(response.json()["outputs"]["pooled"], want, rtol=1e-5, atol=1e-6)
    # They did share a batch, which failed and was run again one request at a time.
    assert metric(text, "kiln_batch_reruns_total", engine="emb") == 1
    assert metric(text, "kiln_requests_total", engine="emb", code="400") == 1


async def test_540_rows_run_as_engine_sized_batches_and_are_answered_once(
    app: FastAPI, tmp_path: Path
) -> None:
    model = mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((540, 16)).astype(np.float32)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kiln") as client:
        await ready(client, model, "mlp", max_batch_size="8")
        response = await client.post("/predict", json={"engine": "mlp", "inputs": x.tolist()})
        text = (await client.get("/metrics")).text
    assert response.status_code == 200, response.text
    outputs = np.asarray(response.json()["outputs"]["y"], np.float32)
    np.testing.assert_allclose(outputs, reference_outputs(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert metric(text, "kiln_requests_total", engine="mlp", code="200") == 1
    assert metric(text, "kiln_inferences_total", engine="mlp") == 540  # warm-up runs bypass the batcher
    assert metric(text, "kiln_batches_total", engine="mlp") == 68  # 67 of 8 rows and one of 4


async def test_rows_past_the_request_limit_are_refused_naming_it(tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, store=tmp_path / "store", backend="onnxruntime", grpc_port=0, max_request_rows=100
    )
    application = create_app(settings)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://kiln") as client,
    ):
        await ready(client, mlp(tmp_path / "mlp.onnx"), "mlp", max_batch_size="8")
        body: dict[str, Any] = {"engine": "mlp", "inputs": np.zeros((101, 16)).tolist()}
        response = await client.post("/predict", json=body)
        assert response.status_code == 400
        assert "101 rows" in response.json()["error"]["message"]
        assert "KILN_MAX_REQUEST_ROWS" in response.json()["error"]["message"]
        body["priority"] = -1
        body["inputs"] = np.zeros((1, 16)).tolist()
        response = await client.post("/predict", json=body)
        assert response.status_code == 400 and "'priority'" in response.json()["error"]["message"]


async def test_big_json_bodies_are_decoded_off_the_event_loop_and_answered_the_same(
    app: FastAPI, tmp_path: Path
) -> None:
    model = mlp(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((20_000, 16)).astype(np.float32)  # about 3 MB of JSON
    want = reference_outputs(model, {"x": x})["y"]
    v2 = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://kiln", timeout=60
    ) as client:
        await ready(client, model, "mlp", max_batch_size="8")
        native = await client.post("/predict", json={"engine": "mlp", "inputs": x.tolist()})
        kserve = await client.post("/v2/models/mlp/infer", json=v2)
        ragged = await client.post("/predict", json={"engine": "mlp", "inputs": [*x.tolist(), [1.0]]})
    assert native.status_code == 200, native.text
    np.testing.assert_allclose(native.json()["outputs"]["y"], want, rtol=1e-5, atol=1e-6)
    assert kserve.status_code == 200, kserve.text
    np.testing.assert_allclose(
        np.asarray(kserve.json()["outputs"][0]["data"]).reshape(want.shape), want, rtol=1e-5, atol=1e-6
    )
    assert ragged.status_code == 400 and "rectangular" in ragged.json()["error"]["message"]
