"""Progressive engines through the API, on a classifier trained on scikit-learn's
digits: a failed optimized engine leaves the version on its baseline, progressive=false
serves only the optimized engine, a stored engine needs no baseline."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import upload, wait_for_state
from tests.models import reference_outputs
from tests.precision_models import DIGITS_INPUT, DIGITS_OUTPUT, train_digits_classifier

pytestmark = pytest.mark.slow

BASELINE_LINE = "serves on its baseline engine"
SWAP_LINE = "swapped from its baseline engine"
# No INT8 engine is that close to FP32: its gate fails.
IMPOSSIBLE = '{"max_abs_error": 1e-9}'


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path, _, x_test = train_digits_classifier(tmp_path_factory.mktemp("digits"))
    return path, x_test[:8]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store=tmp_path / "store", backend="onnxruntime"))) as test_client:
        yield test_client


def predict(client: TestClient, engine: str, x: np.ndarray) -> np.ndarray:
    response = client.post("/predict", json={"engine": engine, "inputs": x.tolist()})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"][DIGITS_OUTPUT], np.float32)


def int8(client: TestClient, model: Path, name: str, **fields: Any) -> dict[str, Any]:
    upload(client, model, name, precision="int8", calibration="synthetic", **fields)
    return wait_for_state(client, name)


def test_a_gate_failure_leaves_the_version_serving_on_its_baseline(
    client: TestClient, digits: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    model, x = digits
    with caplog.at_level(logging.INFO, logger="kiln.engines"):
        status = int8(client, model, "strict", tolerance=IMPOSSIBLE)
    assert status["state"] == "fallback"  # serving, but not the int8 that was asked for
    assert status["serving"]["tier"] == "baseline" and status["serving"]["precision"] == "fp32"
    assert status["error"]["type"] == "accuracy_rejected"
    assert "max_abs_error" in status["error"]["message"]
    expected = reference_outputs(model, {DIGITS_INPUT: x})[DIGITS_OUTPUT]
    np.testing.assert_allclose(predict(client, "strict", x), expected, rtol=1e-5, atol=1e-6)
    assert "keeps serving on its baseline engine" in caplog.text
    assert SWAP_LINE not in caplog.text


def test_progressive_false_serves_only_the_optimized_engine(
    client: TestClient, digits: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    model, x = digits
    with caplog.at_level(logging.INFO, logger="kiln.engines"):
        status = int8(client, model, "plain", progressive="false", tolerance=IMPOSSIBLE)
    # As without progressive engines: nothing serves until the optimized engine does.
    assert status["state"] == "failed" and status["progressive"] is False
    assert status["error"]["type"] == "accuracy_rejected" and status["serving"] is None
    response = client.post("/predict", json={"engine": "plain", "inputs": x.tolist()})
    assert response.status_code == 409
    assert BASELINE_LINE not in caplog.text


def test_an_upload_whose_engine_is_stored_skips_the_baseline(
    client: TestClient, digits: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    model, x = digits
    with caplog.at_level(logging.INFO, logger="kiln.engines"):
        first = int8(client, model, "m")
        assert caplog.text.count(BASELINE_LINE) == 1 and caplog.text.count(SWAP_LINE) == 1
        second = int8(client, model, "m")  # identical: version 2 reuses the stored INT8 engine
    assert second["version"] == 2 and second["serving"]["tier"] == "optimized"
    assert caplog.text.count(BASELINE_LINE) == 1, "the identical upload loaded a baseline"
    assert first["serving"]["precision"] == second["serving"]["precision"] == "int8"
    assert first["serving"]["provider"] == "CPUExecutionProvider"
    assert first["created_at"] <= first["serving"]["since"]
    metrics = client.get("/metrics").text
    labels = 'backend="onnxruntime",engine="m",precision="int8",tier="optimized",version="2"'
    assert f"kiln_engine_serving{{{labels}}} 1.0" in metrics
    predict(client, "m", x)
