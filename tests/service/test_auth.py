"""API keys: every rule with its status and message, through the ASGI app; and
the CLI's refusal to listen on a public address without keys."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import check_key, presented_key
from service.cli import main as cli
from service.errors import Forbidden, Unauthorized
from service.settings import Settings
from tests.conftest import wait_for_state

KEY = "s3cret-key-one"
OTHER_KEY = "second-key"
ROW = [0.25] * 16


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def model_form(path: Path, name: str) -> dict[str, Any]:
    return {
        "files": {"model": (path.name, path.read_bytes(), "application/octet-stream")},
        "data": {"name": name},
    }


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[TestClient]:
    """Keys configured and predictions protected; one ready engine 'mlp'."""
    settings = Settings(
        store=tmp_path_factory.mktemp("auth-store"),
        backend="onnxruntime",
        api_keys=[KEY, OTHER_KEY],
        protect_predict=True,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/engines", headers=bearer(KEY), **model_form(model_files["mlp"], "mlp"))
        assert response.status_code == 202, response.text
        assert wait_for_state(client, "mlp")["state"] == "ready"
        yield client


@pytest.fixture(scope="module")
def management_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """Keys configured, predictions open (the default)."""
    settings = Settings(
        store=tmp_path_factory.mktemp("auth-open-predict"), backend="onnxruntime", api_keys=[KEY]
    )
    with TestClient(create_app(settings)) as client:
        yield client


def assert_error(response: Any, status: int, kind: str, match: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == kind
    assert match in error["message"]


# -- management --------------------------------------------------------------


def test_upload_without_a_key_is_401_and_says_how_to_send_one(
    protected: TestClient, model_files: dict[str, Path]
) -> None:
    response = protected.post("/engines", **model_form(model_files["mlp"], "nokey"))
    assert_error(response, 401, "unauthorized", "needs an API key")
    assert "Authorization: Bearer" in response.json()["error"]["message"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert protected.get("/engines/nokey").status_code == 404


@pytest.mark.parametrize(
    "headers",
    [bearer("wrong"), {"X-API-Key": "wrong"}, bearer(KEY + "x"), bearer(KEY[:-1])],
    ids=["bearer", "x-api-key", "longer", "prefix"],
)
def test_upload_with_a_wrong_key_is_403(
    protected: TestClient, model_files: dict[str, Path], headers: dict[str, str]
) -> None:
    response = protected.post("/engines", headers=headers, **model_form(model_files["mlp"], "wrong"))
    assert_error(response, 403, "forbidden", "the API key is not valid")
    assert protected.get("/engines/wrong").status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        bearer(KEY),
        bearer(OTHER_KEY),
        {"Authorization": f"bearer {KEY}"},
        {"Authorization": f"Bearer   {KEY}  "},
        {"X-API-Key": KEY},
    ],
    ids=["bearer", "second-key", "lower-case-scheme", "padded", "x-api-key"],
)
def test_a_configured_key_is_accepted_for_uploads(
    protected: TestClient, model_files: dict[str, Path], headers: dict[str, str]
) -> None:
    # A garbage model shows the key passed: the request reached validation.
    response = protected.post(
        "/engines",
        headers=headers,
        files={"model": ("m.onnx", b"not onnx", "application/octet-stream")},
        data={"name": "accepted"},
    )
    assert_error(response, 400, "invalid_model", "not an ONNX model")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"Basic {KEY}"}, 401),  # another scheme is no key
        ({"Authorization": "Bearer "}, 401),  # an empty token is no key
        ({"Authorization": "Bearer", "X-API-Key": KEY}, 200),  # falls back to X-API-Key
        ({"Authorization": "Bearer nope", "X-API-Key": KEY}, 403),  # Bearer wins
    ],
    ids=["basic", "empty-bearer", "fallback", "bearer-first"],
)
def test_which_header_counts(protected: TestClient, headers: dict[str, str], status: int) -> None:
    response = protected.post("/predict", headers=headers, json={"engine": "mlp", "inputs": [ROW]})
    assert response.status_code == status, response.text


def test_delete_needs_the_key(protected: TestClient, model_files: dict[str, Path]) -> None:
    created = protected.post("/engines", headers=bearer(KEY), **model_form(model_files["mlp"], "gone"))
    assert created.status_code == 202
    wait_for_state(protected, "gone")
    for path in ("/engines/gone", "/engines/gone/versions/1"):
        assert_error(protected.delete(path), 401, "unauthorized", "needs an API key")
        assert_error(protected.delete(path, headers=bearer("nope")), 403, "forbidden", "not valid")
    assert protected.get("/engines/gone").status_code == 200
    deleted = protected.delete("/engines/gone/versions/1", headers={"X-API-Key": KEY})
    assert deleted.status_code == 200, deleted.text
    assert protected.get("/engines/gone").status_code == 404


def test_reading_and_health_need_no_key(protected: TestClient) -> None:
    for path in (
        "/engines",
        "/engines/mlp",
        "/engines/mlp/versions/1",
        "/health/live",
        "/health/ready",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
    ):
        assert protected.get(path).status_code == 200, path


# -- prediction ----------------------------------------------------------------


def test_native_predict_needs_a_key_when_protected(protected: TestClient) -> None:
    body = {"engine": "mlp", "inputs": [ROW]}
    assert_error(protected.post("/predict", json=body), 401, "unauthorized", "needs an API key")
    assert_error(protected.post("/predict", json=body, headers=bearer("nope")), 403, "forbidden", "not valid")
    # The key is checked before anything else: an unknown engine is still a 401.
    missing = protected.post("/predict", json={"engine": "nope", "inputs": [ROW]})
    assert missing.status_code == 401
    for headers in (bearer(KEY), {"X-API-Key": OTHER_KEY}):
        response = protected.post("/predict", json=body, headers=headers)
        assert response.status_code == 200, response.text
        assert len(response.json()["outputs"]["y"][0]) == 4


V2_INFER = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ROW}]}
V2_ENDPOINTS = [
    ("GET", "/v2/models/mlp", None),
    ("GET", "/v2/models/mlp/versions/1", None),
    ("GET", "/v2/models/mlp/ready", None),
    ("GET", "/v2/models/mlp/versions/1/ready", None),
    ("GET", "/v2/models/mlp/config", None),
    ("GET", "/v2/models/mlp/versions/1/config", None),
    ("POST", "/v2/models/mlp/infer", V2_INFER),
    ("POST", "/v2/models/mlp/versions/1/infer", V2_INFER),
]


@pytest.mark.parametrize(("method", "path", "body"), V2_ENDPOINTS, ids=[e[1] for e in V2_ENDPOINTS])
def test_every_v2_model_endpoint_needs_a_key_when_protected(
    protected: TestClient, method: str, path: str, body: Any
) -> None:
    without = protected.request(method, path, json=body)
    assert without.status_code == 401, without.text
    assert "needs an API key" in without.json()["error"]  # Triton's error shape on /v2
    wrong = protected.request(method, path, json=body, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403
    assert wrong.json() == {"error": "the API key is not valid"}
    good = protected.request(method, path, json=body, headers=bearer(KEY))
    assert good.status_code == 200, good.text


def test_prediction_is_open_unless_protected(management_only: TestClient) -> None:
    # No engine here: 404 shows the request went past authentication.
    response = management_only.post("/predict", json={"engine": "none", "inputs": [ROW]})
    assert_error(response, 404, "not_found", "no engine named 'none'")
    assert management_only.get("/v2/models/none").status_code == 404
    upload = management_only.post(
        "/engines", files={"model": ("m.onnx", b"x", "application/octet-stream")}, data={"name": "a"}
    )
    assert_error(upload, 401, "unauthorized", "needs an API key")


def test_without_keys_nothing_needs_one(tmp_path: Path) -> None:
    settings = Settings(store=tmp_path / "store", backend="onnxruntime", protect_predict=True)
    with TestClient(create_app(settings)) as client:
        upload = client.post(
            "/engines", files={"model": ("m.onnx", b"x", "application/octet-stream")}, data={"name": "a"}
        )
        assert_error(upload, 400, "invalid_model", "not an ONNX model")
        predict = client.post("/predict", json={"engine": "none", "inputs": [ROW]})
        assert predict.status_code == 404


# -- keys from a file (a mounted Kubernetes Secret) -----------------------------


def test_keys_file_lines_are_keys(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2024-05\nfile-key-1\n\n  file-key-2  \n")
    settings = Settings(
        store=tmp_path / "store", backend="onnxruntime", api_keys=["env-key"], api_keys_file=keys_file
    )
    assert settings.all_api_keys() == ["env-key", "file-key-1", "file-key-2"]
    with TestClient(create_app(settings)) as client:
        for key in ("env-key", "file-key-1", "file-key-2"):
            response = client.post(
                "/engines",
                headers=bearer(key),
                files={"model": ("m.onnx", b"x", "application/octet-stream")},
                data={"name": "a"},
            )
            assert response.status_code == 400, (key, response.text)
        refused = client.post("/engines", headers=bearer("# rotated 2024-05"), data={"name": "a"})
        assert refused.status_code == 403


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys_file = tmp_path / "secret"
    keys_file.write_text("from-file\n")
    monkeypatch.setenv("KILN_API_KEYS", " a , b,,")
    monkeypatch.setenv("KILN_API_KEYS_FILE", str(keys_file))
    assert Settings().all_api_keys() == ["a", "b", "from-file"]


# -- constant time -----------------------------------------------------------------


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ["k1", "k2", "k3"]
    check_key({"x-api-key": "k1"}.get, keys)
    assert len(calls) == 3  # no early exit on the first key
    calls.clear()
    with pytest.raises(Forbidden, match="not valid"):
        check_key({"x-api-key": "zz"}.get, keys)
    assert len(calls) == 3
    with pytest.raises(Unauthorized, match="needs an API key"):
        check_key({}.get, keys)
    check_key({}.get, [])  # no keys configured: nothing to check


def test_presented_key() -> None:
    assert presented_key({"authorization": "Bearer abc"}.get) == "abc"
    assert presented_key({"authorization": "Token abc"}.get) is None
    assert presented_key({"x-api-key": " abc "}.get) == "abc"
    assert presented_key({}.get) is None


# -- kiln serve: where it may listen -------------------------------------------------


@pytest.fixture
def serve_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[Any]]:
    """A clean KILN_* environment, run_server replaced by a recorder (no socket is
    opened), and the root logger restored afterwards."""
    for name in ("KILN_API_KEYS", "KILN_API_KEYS_FILE", "KILN_ALLOW_UNAUTHENTICATED", "KILN_HOST"):
        monkeypatch.delenv(name, raising=False)
    started: list[Any] = []
    monkeypatch.setattr("service.server.run_server", started.append)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield started
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def serve(tmp_path: Path, host: str) -> int:
    return cli.main(["serve", "--host", host, "--port", "0", "--store", str(tmp_path / "store")])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "kiln.example", ""])
def test_serve_refuses_a_public_address_without_keys(
    serve_env: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    assert serve(tmp_path, host) == 2
    err = capsys.readouterr().err
    assert f"refusing to listen on {host} without API keys" in err
    assert "KILN_ALLOW_UNAUTHENTICATED=true" in err
    assert serve_env == []


def test_serve_allows_a_public_address_when_told_and_says_so(
    serve_env: list[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_ALLOW_UNAUTHENTICATED", "true")
    assert serve(tmp_path, "0.0.0.0") == 0
    assert [s.host for s in serve_env] == ["0.0.0.0"]
    assert "serving on 0.0.0.0 WITHOUT authentication" in capsys.readouterr().err


def test_serve_on_a_public_address_with_keys(
    serve_env: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("k\n")
    monkeypatch.setenv("KILN_API_KEYS_FILE", str(keys_file))
    assert serve(tmp_path, "0.0.0.0") == 0
    assert serve_env[0].all_api_keys() == ["k"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_serve_on_loopback_needs_no_keys(
    serve_env: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str
) -> None:
    assert serve(tmp_path, host) == 0
    assert "listening on loopback only" in capsys.readouterr().err


def test_serve_with_an_empty_keys_file_counts_as_no_keys(
    serve_env: list[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("\n# nothing yet\n")
    monkeypatch.setenv("KILN_API_KEYS_FILE", str(keys_file))
    assert serve(tmp_path, "0.0.0.0") == 2
    assert "without API keys" in capsys.readouterr().err


def test_serve_with_an_unreadable_keys_file_says_which_setting(
    serve_env: list[Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_API_KEYS_FILE", str(tmp_path / "missing"))
    assert serve(tmp_path, "127.0.0.1") == 2
    assert "KILN_API_KEYS_FILE cannot be read" in capsys.readouterr().err
    assert serve_env == []
