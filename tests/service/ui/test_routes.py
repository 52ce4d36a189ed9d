"""The page's routes through the ASGI app: security headers, keys on the JSON views,
static files from a fixed list, an offline /docs, and the views' content."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.ui.cache import PerSecondCache
from service.ui.routes import STATIC
from tests.conftest import upload, wait_for_state

KEY = "ui-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Iterator[TestClient]:
    """Keys configured; one ready engine 'mlp'."""
    settings = Settings(store=tmp_path_factory.mktemp("ui-store"), backend="onnxruntime", api_keys=[KEY])
    with TestClient(create_app(settings)) as client:
        client.headers.update(AUTH)
        upload(client, model_files["mlp"], "mlp")
        assert wait_for_state(client, "mlp")["state"] == "ready"
        client.headers.pop("Authorization")
        yield client


@pytest.mark.parametrize("path", ["/", "/docs", "/ui/static/app.js", "/ui/static/style.css"])
def test_page_and_assets_carry_a_strict_csp(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_html_holds_no_inline_script_or_style_and_no_data(client: TestClient) -> None:
    html = client.get("/").text
    assert "<style" not in html and "style=" not in html
    assert all('src="/ui/static/' in tag for tag in html.split("<script")[1:])
    assert "mlp" not in html


def test_docs_use_the_local_swagger_ui(client: TestClient) -> None:
    html = client.get("/docs").text
    assert "/ui/static/vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js" in html
    assert "cdn" not in html and "http" not in html
    bundle = client.get("/ui/static/vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert client.get("/openapi.json").json()["info"]["title"] == "kiln"
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page loads from a CDN


@pytest.mark.parametrize(
    "path", ["/ui/static/../routes.py", "/ui/static/%2e%2e/routes.py", "/ui/static/nope.js"]
)
def test_only_listed_static_files_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("path", ["/ui/api/overview", "/ui/api/engines/mlp"])
def test_views_need_the_management_key(client: TestClient, path: str) -> None:
    missing = client.get(path)
    assert missing.status_code == 401
    assert "needs an API key" in missing.json()["error"]["message"]
    assert "mlp" not in missing.text.replace(path, "")
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get(path, headers=AUTH).status_code == 200


def test_overview_lists_engines_with_traffic(client: TestClient) -> None:
    client.post("/predict", json={"engine": "mlp", "inputs": {"x": [[0.5] * 16]}})
    body = client.get("/ui/api/overview", headers=AUTH).json()
    assert body["server"]["backend"] == "onnxruntime"
    assert body["poll_s"] > 0 and body["builds"] == []
    (engine,) = body["engines"]
    assert engine["name"] == "mlp" and engine["state"] == "ready" and engine["version"] == 1
    assert engine["precision"] == {"requested": "fp32", "chosen": "fp32"} and engine["ready_version"] == 1
    assert set(engine["traffic"]) == {"rps", "errors", "p50_ms", "p99_ms", "queue_ms", "batch"}


def test_engine_view_has_versions_report_and_series(client: TestClient) -> None:
    deadline = time.monotonic() + 5
    while True:  # the sampler adds a point every second
        body = client.get("/ui/api/engines/mlp", headers=AUTH).json()
        if body["traffic"]["t"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (version,) = body["versions"]
    assert version["report"]["latency_ms"] and version["report"]["signature"]["inputs"][0]["name"] == "x"
    assert body["traffic"]["t"] and len(body["traffic"]["rps"]) == len(body["traffic"]["t"])
    assert body["window_s"] == 300 and body["sample_interval_s"] == 1.0
    missing = client.get("/ui/api/engines/nope", headers=AUTH)
    assert missing.status_code == 404 and "no engine named 'nope'" in missing.json()["error"]["message"]


async def test_views_are_built_at_most_once_per_second() -> None:
    cache = PerSecondCache(ttl_s=0.2)
    builds = []

    async def build() -> bytes:
        builds.append(1)
        return str(len(builds)).encode()

    assert await cache.get("view", build) == b"1"
    assert await cache.get("view", build) == b"1"
    assert await cache.get("other", build) == b"2"
    time.sleep(0.25)
    assert await cache.get("view", build) == b"3"


def test_every_vendored_library_has_its_licence() -> None:
    for library in (STATIC / "vendor").iterdir():
        if library.is_dir():
            assert (library / "LICENSE").is_file(), library
