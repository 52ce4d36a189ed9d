"""Every limit with its status and message: uploads (streamed and cut off),
request bodies, JSON nesting and element counts, tensors per request, engines
and versions kept; and the ONNX safety checks as an upload sees them."""

from __future__ import annotations

import gzip
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from service.app import create_app
from service.cli import main as cli
from service.lifecycle.uploads import MAX_PARTS
from service.settings import Settings
from tests.conftest import upload, wait_for_state

MAX_UPLOAD = 8 * 1024  # the mlp model (~3 KB) fits, the cnn model (~21 KB) does not
MAX_DATA = 2 * 1024
MAX_REQUEST = 4 * 1024
MAX_DEPTH = 8
MAX_ELEMENTS = 64  # four rows of the mlp's 16 inputs
ROW = [0.5] * 16


def limited_settings(store: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "store": store,
        "backend": "onnxruntime",
        "max_upload_bytes": MAX_UPLOAD,
        "max_data_bytes": MAX_DATA,
        "max_request_bytes": MAX_REQUEST,
        "max_json_depth": MAX_DEPTH,
        "max_tensor_elements": MAX_ELEMENTS,
        "max_batch_size": 8,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits-store")


@pytest.fixture(scope="module")
def client(store: Path, model_files: dict[str, Path]) -> Iterator[TestClient]:
    with TestClient(create_app(limited_settings(store))) as test_client:
        upload(test_client, model_files["mlp"], "mlp")
        assert wait_for_state(test_client, "mlp")["state"] == "ready"
        yield test_client


def assert_error(response: Any, status: int, match: str, kind: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert match in message, message
    if kind is not None:
        assert error["type"] == kind


def tmp_files(store: Path) -> list[Path]:
    return list((store / "tmp").iterdir())


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.max_upload_bytes == 1024**3
    assert settings.max_data_bytes == 1024**3
    assert settings.max_request_bytes == 64 * 1024**2
    assert settings.max_json_depth == 32
    assert settings.max_tensor_elements == 16 * 1024**2
    assert settings.max_engines == 100
    assert settings.max_versions_per_engine == 10
    assert settings.max_queue_size == 256
    assert settings.drain_timeout_s == 30.0


@pytest.mark.parametrize(
    ("variable", "value", "match"),
    [
        (
            "KILN_MAX_UPLOAD_BYTES",
            "10",
            "KILN_MAX_UPLOAD_BYTES: Input should be greater than or equal to 1024",
        ),
        ("KILN_MAX_REQUEST_BYTES", "lots", "KILN_MAX_REQUEST_BYTES: Input should be a valid integer"),
        ("KILN_MAX_JSON_DEPTH", "1", "KILN_MAX_JSON_DEPTH: Input should be greater than or equal to 2"),
        ("KILN_MAX_TENSOR_ELEMENTS", "0", "KILN_MAX_TENSOR_ELEMENTS"),
        ("KILN_MAX_ENGINES", "-1", "KILN_MAX_ENGINES"),
        ("KILN_MAX_VERSIONS_PER_ENGINE", "0", "KILN_MAX_VERSIONS_PER_ENGINE"),
    ],
)
def test_a_wrong_limit_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, match: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit, match=match):
        cli.main(["serve", "--store", str(tmp_path / "store")])


# -- uploads ---------------------------------------------------------------------


def test_a_model_over_the_upload_limit_is_413_and_leaves_nothing(
    client: TestClient, store: Path, model_files: dict[str, Path]
) -> None:
    response = client.post(
        "/engines",
        files={"model": ("cnn.onnx", model_files["cnn"].read_bytes(), "application/octet-stream")},
        data={"name": "big"},
    )
    assert_error(
        response, 413, f"'model' is larger than its limit of {MAX_UPLOAD} bytes", "payload_too_large"
    )
    assert tmp_files(store) == []
    assert client.get("/engines/big").status_code == 404


def test_data_over_its_limit_is_413(client: TestClient, store: Path, model_files: dict[str, Path]) -> None:
    response = client.post(
        "/engines",
        files={
            "model": ("mlp.onnx", model_files["mlp"].read_bytes(), "application/octet-stream"),
            "calibration": ("c.npz", b"\0" * (MAX_DATA + 1), "application/octet-stream"),
        },
        data={"name": "data", "precision": "int8"},
    )
    assert_error(response, 413, f"'calibration' is larger than its limit of {MAX_DATA} bytes")
    assert tmp_files(store) == []


def test_a_text_field_over_64_kib_is_413(client: TestClient, model_files: dict[str, Path]) -> None:
    response = client.post(
        "/engines",
        files={"model": ("mlp.onnx", model_files["mlp"].read_bytes(), "application/octet-stream")},
        data={"name": "x" * (64 * 1024 + 1)},
    )
    assert_error(response, 413, "form field 'name' is larger than 65536 bytes")


def test_a_form_with_too_many_parts_is_400(client: TestClient) -> None:
    files = [(f"f{i}", (None, "v")) for i in range(MAX_PARTS + 8)]
    response = client.post("/engines", files=files)
    assert_error(response, 400, f"more than {MAX_PARTS} parts")


def test_a_huge_part_header_is_400(client: TestClient) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"; x="{"y" * 10000}"\r\n\r\n'
        f"v\r\n--{boundary}--\r\n"
    ).encode()
    response = client.post(
        "/engines", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_error(response, 400, "malformed multipart body")


def asgi_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


class CountingBody:
    """An ASGI receive() over a large body that is only produced when asked for."""

    def __init__(self, prefix: bytes, chunk: bytes, count: int) -> None:
        self.parts = [prefix]
        self.chunk = chunk
        self.count = count
        self.given = 0

    async def __call__(self) -> dict[str, Any]:
        if self.parts:
            data = self.parts.pop()
        elif self.count > 0:
            self.count -= 1
            data = self.chunk
        else:
            return {"type": "http.disconnect"}
        self.given += len(data)
        return {"type": "http.request", "body": data, "more_body": self.count > 0}


async def run_asgi(app: FastAPI, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


@pytest.fixture
async def bare_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(limited_settings(tmp_path / "store"))
    async with app.router.lifespan_context(app):
        yield app


CHUNK = 64 * 1024
GIB_OF_CHUNKS = 1024**3 // CHUNK


async def test_an_upload_is_cut_off_at_its_limit_not_read_whole(bare_app: FastAPI, tmp_path: Path) -> None:
    boundary = b"xyzzy"
    prefix = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
    )
    receive = CountingBody(prefix, b"\x08" * CHUNK, GIB_OF_CHUNKS)  # a 1 GiB "model"
    scope = asgi_scope("POST", "/engines", [(b"content-type", b"multipart/form-data; boundary=" + boundary)])
    status, body = await run_asgi(bare_app, scope, receive)
    assert status == 413
    assert b"larger than its limit" in body
    assert receive.given <= len(prefix) + MAX_UPLOAD + CHUNK  # stopped at the first chunk past the limit
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


async def test_a_chunked_body_over_the_request_limit_is_cut_off(bare_app: FastAPI) -> None:
    receive = CountingBody(b"[", b"1," * (CHUNK // 2), GIB_OF_CHUNKS)  # no Content-Length
    scope = asgi_scope("POST", "/predict", [(b"content-type", b"application/json")])
    status, body = await run_asgi(bare_app, scope, receive)
    assert status == 413
    assert b"larger than the limit of 4096 bytes" in body
    assert receive.given <= MAX_REQUEST + CHUNK + 1


async def test_a_v2_body_for_a_model_that_cannot_take_it_is_never_read(bare_app: FastAPI) -> None:
    receive = CountingBody(b"[", b"1," * (CHUNK // 2), GIB_OF_CHUNKS)
    scope = asgi_scope("POST", "/v2/models/mlp/infer", [(b"content-type", b"application/json")])
    status, _ = await run_asgi(bare_app, scope, receive)
    assert status == 404  # known from the path, before the body
    assert receive.given == 0


# -- request bodies ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/predict", "/v2/models/mlp/infer"])
def test_a_declared_body_over_the_request_limit_is_413(client: TestClient, path: str) -> None:
    response = client.post(
        path, content=b" " * (MAX_REQUEST + 1), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, f"the request body is {MAX_REQUEST + 1} bytes; the limit is {MAX_REQUEST}")


def test_a_streamed_body_over_the_request_limit_is_413(client: TestClient) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 1024

    response = client.post("/predict", content=body(), headers={"Content-Type": "application/json"})
    assert_error(response, 413, f"larger than the limit of {MAX_REQUEST} bytes")


def test_a_gzip_bomb_is_413(client: TestClient) -> None:
    bomb = gzip.compress(b" " * (1024 * 1024))
    assert len(bomb) < MAX_REQUEST
    response = client.post("/v2/models/mlp/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert_error(response, 413, f"decompressed request body is larger than the limit of {MAX_REQUEST}")


def nested(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nesting_deeper_than_the_limit_is_400(client: TestClient) -> None:
    # The object is level 1 and each list one more: MAX_DEPTH lists inside it are too deep.
    response = client.post("/predict", json={"engine": "mlp", "inputs": nested(MAX_DEPTH + 1)})
    assert_error(response, 400, f"nests deeper than {MAX_DEPTH} levels", "bad_request")
    v2 = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": nested(MAX_DEPTH + 1)}]}
    assert_error(client.post("/v2/models/mlp/infer", json=v2), 400, f"nests deeper than {MAX_DEPTH} levels")
    params = {"inputs": [], "parameters": {"a": nested(MAX_DEPTH + 1)}}
    assert_error(client.post("/v2/models/mlp/infer", json=params), 400, "nests deeper")


def test_nesting_past_the_parser_limit_is_400_not_a_crash(client: TestClient) -> None:
    deep = b'{"engine": "mlp", "inputs": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    assert_error(client.post("/predict", content=deep), 400, "not valid JSON")
    assert_error(
        client.post("/v2/models/mlp/infer", content=b"[" * 1500 + b"]" * 1500), 400, "not valid JSON"
    )


def test_json_with_more_numbers_than_the_limit_is_400(client: TestClient) -> None:
    ok = client.post("/predict", json={"engine": "mlp", "inputs": [ROW] * 4})
    assert ok.status_code == 200, ok.text
    response = client.post("/predict", json={"engine": "mlp", "inputs": [ROW] * 5})
    assert_error(response, 400, f"holds more than {MAX_ELEMENTS} numbers")
    spread = {"engine": "mlp", "inputs": [ROW] * 3, "extra": [[1.0] * 17]}
    assert_error(client.post("/predict", json=spread), 400, f"more than {MAX_ELEMENTS} numbers")
    v2 = {"inputs": [{"name": "x", "shape": [5, 16], "datatype": "FP32", "data": [ROW] * 5}]}
    assert_error(client.post("/v2/models/mlp/infer", json=v2), 400, f"more than {MAX_ELEMENTS} numbers")


def test_declared_tensor_sizes_over_the_limit_are_400_before_any_data(client: TestClient) -> None:
    huge = {"inputs": [{"name": "x", "shape": [10**9, 16], "datatype": "FP32", "data": []}]}
    assert_error(client.post("/v2/models/mlp/infer", json=huge), 400, f"the limit is {MAX_ELEMENTS}")
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2**40, 2**40],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    )
    response = client.post(
        "/v2/models/mlp/infer",
        content=header + b"\0" * 64,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert_error(response, 400, f"the limit is {MAX_ELEMENTS}")


# -- engines and versions ------------------------------------------------------------


def test_the_engine_count_limit_is_429(tmp_path: Path, model_files: dict[str, Path]) -> None:
    with TestClient(create_app(limited_settings(tmp_path / "store", max_engines=2))) as client:
        upload(client, model_files["mlp"], "one")
        upload(client, model_files["mlp"], "two")
        third = client.post(
            "/engines",
            files={"model": ("mlp.onnx", model_files["mlp"].read_bytes(), "application/octet-stream")},
            data={"name": "three"},
        )
        assert_error(third, 429, "the server holds 2 engines, its limit (KILN_MAX_ENGINES)", "limit_reached")
        # A new version of a known engine is not a new engine.
        assert upload(client, model_files["mlp"], "one")["version"] == 2
        for name in ("one", "two"):
            wait_for_state(client, name)
        assert client.delete("/engines/two").status_code == 200
        assert upload(client, model_files["mlp"], "three")["version"] == 1
        wait_for_state(client, "three")


def versions_of(client: TestClient, name: str) -> list[int]:
    return [v["version"] for v in client.get(f"/engines/{name}").json()["versions"]]


def wait_for_versions(client: TestClient, name: str, want: list[int], timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    found = versions_of(client, name)
    while found != want and time.monotonic() < deadline:
        time.sleep(0.05)
        found = versions_of(client, name)
    return found


def test_old_versions_are_pruned_past_the_limit(tmp_path: Path, model_files: dict[str, Path]) -> None:
    with TestClient(create_app(limited_settings(tmp_path / "store", max_versions_per_engine=2))) as client:
        for _ in range(3):
            created = upload(client, model_files["mlp"], "kept")
            assert wait_for_state(client, "kept", created["version"])["state"] == "ready"
        assert wait_for_versions(client, "kept", [2, 3]) == [2, 3]
        assert client.post("/predict", json={"engine": "kept", "inputs": [ROW]}).json()["version"] == 3


def test_versions_uploaded_while_building_are_pruned_once_ready(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    with TestClient(create_app(limited_settings(tmp_path / "store", max_versions_per_engine=2))) as client:
        for _ in range(3):
            upload(client, model_files["mlp"], "burst")
        wait_for_state(client, "burst", 3)
        assert wait_for_versions(client, "burst", [2, 3], timeout_s=10) == [2, 3]


# -- ONNX safety, as an upload sees it -------------------------------------------------


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    return buffer.getvalue()


def small_model(nodes: list[onnx.NodeProto], initializers: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [*nodes, helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["a", "b"]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def post_model(client: TestClient, content: bytes, name: str = "unsafe") -> Any:
    return client.post(
        "/engines",
        files={"model": ("m.onnx", content, "application/octet-stream")},
        data={"name": name},
    )


def test_a_model_with_external_data_is_400(client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    weights = numpy_helper.from_array(np.zeros(16, np.float32), "w")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    weights.external_data.add(key="location", value=str(secret))
    model = small_model([helper.make_node("Identity", ["w"], ["c"])], [weights])
    response = post_model(client, onnx_bytes(model))
    message = f"tensor 'w': the data location '{secret}' is an absolute path"
    assert_error(response, 400, message, "invalid_model")


def test_a_model_needing_a_huge_tensor_is_422(client: TestClient) -> None:
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "s")
    model = small_model([helper.make_node("ConstantOfShape", ["s"], ["c"])], [shape])
    response = post_model(client, onnx_bytes(model))
    assert_error(response, 422, "would create a tensor of at least 10000000000 elements", "unsupported_model")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "the model file is empty"),
        (b"\xff" * 100, "not an ONNX model"),
        (b"\x0a\xff\xff\xff\xff\x0f", "not an ONNX model"),  # a field claims 4 GiB
    ],
    ids=["empty", "garbage", "length-overflow"],
)
def test_undecodable_models_are_400(client: TestClient, content: bytes, match: str) -> None:
    assert_error(post_model(client, content), 400, match, "invalid_model")


@pytest.mark.parametrize(
    ("env", "loop", "json_logs"),
    [({}, "auto", False), ({"KILN_EVENT_LOOP": "asyncio", "KILN_LOG_JSON": "true"}, "asyncio", True)],
)
def test_serve_hands_the_event_loop_and_log_format_to_uvicorn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], loop: str, json_logs: bool
) -> None:
    from service import server

    seen: list[Any] = []
    monkeypatch.setattr(server.DrainingServer, "run", lambda self: seen.append(self.config))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert cli.main(["serve", "--port", "0", "--store", str(tmp_path / "store")]) == 0
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert seen[0].loop == loop
    assert (seen[0].log_config is None) is json_logs
