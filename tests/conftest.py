"""Shared fixtures: tiny models built once per session, and app helpers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import models

os.environ.setdefault("KILN_BACKEND", "onnxruntime")
# Servers under test serve gRPC only where a test gives them a port (8001 is shared).
os.environ.setdefault("KILN_GRPC_PORT", "0")

MODEL_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "mlp": models.mlp,
    "cnn": models.cnn,
    "two_in_two_out": models.two_in_two_out,
    "int64_embedding": models.int64_embedding,
    "fixed_batch_one": models.fixed_batch_one,
}


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    return {name: build(directory / f"{name}.onnx") for name, build in MODEL_BUILDERS.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_state(
    client: Any,
    name: str,
    version: int | None = None,
    *,
    timeout_s: float = 90.0,
    states: tuple[str, ...] = ("ready", "fallback", "failed"),
) -> dict[str, Any]:
    """Poll an engine version's status until it reaches one of ``states``."""
    url = f"/engines/{name}" + (f"/versions/{version}" if version else "")
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(url)
        if response.status_code == 200:
            status = response.json()
            if status["state"] in states:
                return status
        time.sleep(0.1)
    raise AssertionError(f"{url} did not reach {states} in {timeout_s} s; last status: {status}")


def upload(client: Any, path: Path, name: str, **fields: Any) -> dict[str, Any]:
    files = {"model": (path.name, path.read_bytes(), "application/octet-stream")}
    extra = fields.pop("files", {})
    files.update(extra)
    response = client.post("/engines", files=files, data={"name": name, **fields})
    assert response.status_code == 202, response.text
    return dict(response.json())


@pytest.fixture(scope="session")
def dynamo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` + ``model.onnx.data`` as torch's dynamo exporter writes them."""
    from tests.external_data_models import dynamo_cnn

    return dynamo_cnn(tmp_path_factory.mktemp("dynamo"))
