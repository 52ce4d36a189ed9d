"""X-Request-ID on every response (the /predict fast path included) and on JSON
log lines written while the request, or work it started, runs."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.logs import JsonFormatter
from service.request_id import REQUEST_ID, client_request_id
from service.settings import Settings
from tests.conftest import wait_for_state

GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(store=tmp_path_factory.mktemp("request-id-store"), backend="onnxruntime")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


REQUESTS = [
    ("POST", "/predict", {"engine": "none", "inputs": [[1.0]]}),  # the fast path
    ("GET", "/health/live", None),
    ("GET", "/engines", None),
    ("GET", "/v2/models/none", None),
    ("POST", "/v2/models/none/infer", {"inputs": []}),
    ("GET", "/nowhere", None),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS, ids=[r[1] for r in REQUESTS])
def test_a_sane_client_id_is_echoed(client: TestClient, method: str, path: str, body: object) -> None:
    response = client.request(method, path, json=body, headers={"X-Request-ID": "trace.ABC_123-x"})
    assert response.headers["x-request-id"] == "trace.ABC_123-x"
    assert response.headers.get_list("x-request-id") == ["trace.ABC_123-x"]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS, ids=[r[1] for r in REQUESTS])
def test_without_one_an_id_is_made(client: TestClient, method: str, path: str, body: object) -> None:
    first = client.request(method, path, json=body).headers["x-request-id"]
    second = client.request(method, path, json=body).headers["x-request-id"]
    assert GENERATED.match(first) and GENERATED.match(second)
    assert first != second


@pytest.mark.parametrize(
    "value",
    ["x" * 129, "has space", "semi;colon", "new\\nline", 'quote"', "é", "a/b", "<script>"],
)
def test_an_insane_client_id_is_replaced(client: TestClient, value: str) -> None:
    response = client.get("/health/live", headers={"X-Request-ID": value.encode("utf-8")})
    assert GENERATED.match(response.headers["x-request-id"])


def test_the_longest_sane_id_is_kept(client: TestClient) -> None:
    value = "a" * 128
    assert client.get("/health/live", headers={"X-Request-ID": value}).headers["x-request-id"] == value


def test_client_request_id() -> None:
    assert client_request_id([(b"x-request-id", b"abc")]) == b"abc"
    assert client_request_id([(b"X-Request-ID", b"abc")]) == b"abc"
    assert client_request_id([(b"x-request-id", b"")]) is None
    assert client_request_id([]) is None


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def test_json_log_lines_carry_the_request_id(client: TestClient, model_files: dict[str, Path]) -> None:
    collect = Collect()
    logger = logging.getLogger("kiln")
    logger.addHandler(collect)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        files = {"model": ("mlp.onnx", model_files["mlp"].read_bytes(), "application/octet-stream")}
        response = client.post(
            "/engines", files=files, data={"name": "traced"}, headers={"X-Request-ID": "upload-42"}
        )
        assert response.status_code == 202
        assert wait_for_state(client, "traced")["state"] == "ready"
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    # The build runs in a task the upload started: its log lines keep the upload's id.
    ready = [line for line in collect.lines if "is ready" in str(line["message"])]
    assert ready, collect.lines
    assert ready[0]["request_id"] == "upload-42"
    assert ready[0]["logger"] == "kiln.engines"
    assert REQUEST_ID.get() is None  # nothing leaked into the test's own context


def test_json_formatter_outside_a_request() -> None:
    record = logging.LogRecord("kiln", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and "request_id" not in line
    record.request_id = "explicit"
    assert json.loads(JsonFormatter().format(record))["request_id"] == "explicit"
