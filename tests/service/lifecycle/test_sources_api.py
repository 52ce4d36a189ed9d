"""Models and data by URI through ``POST /engines``, against a real S3 server
(SeaweedFS) and a local HTTPS server: a torch export whose data file sits beside its
graph in a bucket builds and serves; every bad source is a clear 4xx (503 for an
endpoint that is down) and registers nothing."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import free_port, wait_for_state
from tests.external_data_models import package_members
from tests.http_files import serve_files
from tests.s3server import SeaweedS3
from tests.service.lifecycle.test_external_data_api import assert_serves_like_the_export

MAX_UPLOAD = 512 * 1024


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sources-store")


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    settings = Settings(store=store, backend="onnxruntime", max_batch_size=4, max_upload_bytes=MAX_UPLOAD)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def exported(s3_server: SeaweedS3, dynamo_model: Path) -> dict[str, Any]:
    """torch's dynamo export in the bucket as users keep it: the graph and its data
    file side by side under one prefix."""
    folder = f"exports/{uuid.uuid4().hex}"
    members = package_members(dynamo_model)
    uris = {name: s3_server.put(f"{folder}/{name}", data) for name, data in members.items()}
    return {"uri": uris["model.onnx"], "members": members, "folder": folder}


def post(client: TestClient, name: str, files: dict[str, Any] | None = None, **fields: str) -> Any:
    """A multipart upload of text fields (as ``curl -F name=... -F source=...``) and files."""
    parts = {key: (None, value) for key, value in {"name": name, **fields}.items()}
    return client.post("/engines", files={**parts, **(files or {})})


def nothing_registered(client: TestClient, store: Path, name: str) -> None:
    assert client.get(f"/engines/{name}").status_code == 404
    assert not (store / "records" / name).exists()
    assert not list((store / "tmp").iterdir())  # what was fetched is gone


def test_a_model_by_s3_uri_with_its_data_file_beside_it_builds_and_serves(
    client: TestClient, store: Path, s3: SeaweedS3, exported: dict[str, Any], dynamo_model: Path
) -> None:
    graph_sha = hashlib.sha256(exported["members"]["model.onnx"]).hexdigest()
    response = post(client, "from-s3", source=exported["uri"], sha256=graph_sha)
    assert response.status_code == 202, response.text
    status = wait_for_state(client, "from-s3")
    assert status["state"] == "ready", status
    assert status["model_filename"] == "model.onnx"
    # Stored as the same package an upload of the two files makes.
    package = store / "models" / status["model_sha256"]
    assert sorted(p.name for p in package.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert not list((store / "tmp").iterdir())
    assert_serves_like_the_export(client, "from-s3", dynamo_model)


def test_calibration_data_by_uri_calibrates_int8(
    client: TestClient, s3: SeaweedS3, model_files: dict[str, Path]
) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    data = buffer.getvalue()
    folder = uuid.uuid4().hex
    model_uri = s3.put(f"{folder}/mlp.onnx", model_files["mlp"].read_bytes())
    data_uri = s3.put(f"{folder}/calibration.npz", data)
    response = post(client, "int8-by-uri", source=model_uri, precision="int8", calibration_source=data_uri)
    assert response.status_code == 202, response.text
    status = wait_for_state(client, "int8-by-uri")
    assert status["state"] == "ready", status
    assert status["build_options"]["calibration_sha256"] == hashlib.sha256(data).hexdigest()
    assert status["report"]["precision"] == "int8"


def test_a_model_by_https_url_builds_and_serves(
    client: TestClient, dynamo_model: Path, exported: dict[str, Any], trusted_ca: Any
) -> None:
    with serve_files(trusted_ca) as web:
        web.files = {f"/cnn/{name}": data for name, data in exported["members"].items()}
        response = post(client, "from-web", source=f"{web.url}/cnn/model.onnx")
        assert response.status_code == 202, response.text
    status = wait_for_state(client, "from-web")
    assert status["state"] == "ready", status
    assert web.requests == ["/cnn/model.onnx", "/cnn/model.onnx.data"]
    assert_serves_like_the_export(client, "from-web", dynamo_model)


BAD_SOURCES: dict[str, tuple[dict[str, str], int, str, str]] = {
    "wrong sha256": ({"sha256": "ab" * 32}, 400, "checksum_mismatch", "not the abab"),
    "sha256 not hex": ({"sha256": "xyz"}, 400, "bad_request", "64 hexadecimal digits"),
    "missing key": (
        {"source": "s3://kiln-test/no/such/model.onnx"},
        400,
        "source_not_found",
        "does not exist",
    ),
    "missing bucket": (
        {"source": "s3://no-such-bucket/model.onnx"},
        400,
        "source_not_found",
        "does not exist",
    ),
    "data file not beside the graph": (
        {"source": "{lonely}"},
        400,
        "source_not_found",
        "names the data file",
    ),
    "a folder, not an object": (
        {"source": "s3://kiln-test/exports/"},
        400,
        "invalid_source",
        "names a folder",
    ),
    "plain http": (
        {"source": "http://127.0.0.1:9/model.onnx"},
        400,
        "invalid_source",
        "KILN_SOURCE_ALLOW_HTTP",
    ),
    "an unsupported scheme": (
        {"source": "gs://bucket/model.onnx"},
        400,
        "invalid_source",
        "use s3:// or https://",
    ),
    "source and a model file": ({"model": "file"}, 400, "bad_request", "not both"),
    "over the upload limit": ({"source": "{big}"}, 413, "payload_too_large", "(KILN_MAX_UPLOAD_BYTES)"),
    "bad credentials": ({"AWS_SECRET_ACCESS_KEY": "wrong"}, 403, "source_access_denied", "refused access"),
    "no credentials": (
        {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
        403,
        "source_access_denied",
        "no usable S3 credentials",
    ),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_bad_sources_are_clear_4xx_and_register_nothing(
    client: TestClient,
    store: Path,
    s3: SeaweedS3,
    exported: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    changes, status, kind, message = BAD_SOURCES[case]
    fields = {"source": exported["uri"]}
    files: dict[str, Any] = {}
    for name, value in changes.items():
        if name.startswith("AWS_"):
            if value:
                monkeypatch.setenv(name, value)
            else:
                monkeypatch.delenv(name)
        elif name == "model":
            files = {"model": ("model.onnx", exported["members"]["model.onnx"])}
        elif value == "{lonely}":
            fields["source"] = s3.put(
                f"lonely/{uuid.uuid4().hex}/model.onnx", exported["members"]["model.onnx"]
            )
        elif value == "{big}":
            fields["source"] = s3.put(f"big/{uuid.uuid4().hex}.onnx", b"\0" * (MAX_UPLOAD + 1))
        else:
            fields[name] = value
    name = f"bad-{abs(hash(case))}"
    response = post(client, name, files, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert message in error["message"]
    nothing_registered(client, store, name)


def test_an_unreachable_endpoint_is_503_with_retry_after(
    client: TestClient, store: Path, s3: SeaweedS3, exported: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    response = post(client, "endpoint-down", source=exported["uri"])
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "10"
    error = response.json()["error"]
    assert error["type"] == "source_unavailable"
    assert "cannot be reached" in error["message"]
    nothing_registered(client, store, "endpoint-down")
