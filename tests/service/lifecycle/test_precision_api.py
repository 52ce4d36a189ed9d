"""FP16, INT8 and auto precision through the upload API, on a classifier trained
on scikit-learn's digits, and bad calibration data answered with a 4xx."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import wait_for_state
from tests.precision_models import DIGITS_INPUT, DIGITS_OUTPUT, train_digits_classifier

pytestmark = pytest.mark.slow


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    return train_digits_classifier(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(store=tmp_path_factory.mktemp("precision-store"), backend="onnxruntime")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(client: TestClient, model: Path, name: str, data: dict[str, str], files: dict[str, bytes]):
    parts = {"model": (model.name, model.read_bytes(), "application/octet-stream")}
    parts.update({k: (f"{k}.npz", v, "application/octet-stream") for k, v in files.items()})
    return client.post("/engines", data={"name": name, **data}, files=parts)


def top1(client: TestClient, engine: str, x: np.ndarray) -> np.ndarray:
    predictions = []
    for start in range(0, len(x), 8):
        response = client.post("/predict", json={"engine": engine, "inputs": x[start : start + 8].tolist()})
        assert response.status_code == 200, response.text
        predictions.append(np.argmax(np.asarray(response.json()["outputs"][DIGITS_OUTPUT]), axis=1))
    return np.concatenate(predictions)


def test_int8_and_fp16_agree_with_fp32_on_held_out_digits(
    client: TestClient, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    model, x_train, x_test = digits
    calibration = npz(**{DIGITS_INPUT: x_train[:200]})
    validation = npz(**{DIGITS_INPUT: x_test[:200]})
    assert upload(client, model, "digits32", {}, {}).status_code == 202
    assert (
        upload(client, model, "digits16", {"precision": "fp16"}, {"validation": validation}).status_code
        == 202
    )
    response = upload(
        client,
        model,
        "digits8",
        {"precision": "int8", "calibration_method": "minmax"},
        {"calibration": calibration, "validation": validation},
    )
    assert response.status_code == 202, response.text
    statuses = {
        name: wait_for_state(client, name, timeout_s=180) for name in ("digits32", "digits16", "digits8")
    }
    assert all(s["state"] == "ready" for s in statuses.values()), statuses
    report8 = statuses["digits8"]["report"]
    assert report8["precision"] == "int8"
    assert report8["calibration"]["samples"] == 200 and report8["calibration"]["method"] == "minmax"
    assert report8["validation"]["source"] == "uploaded"
    assert report8["transform"]["method"] == "minmax"
    assert "latency_ms" in report8 and report8["artifact_bytes"] > 0
    assert statuses["digits16"]["report"]["precision"] == "fp16"

    held_out = x_test[200:]
    reference = top1(client, "digits32", held_out)
    for engine in ("digits16", "digits8"):
        agreement = float(np.mean(top1(client, engine, held_out) == reference))
        assert agreement >= 0.99, f"{engine}: top-1 agreement {agreement:.3f} with FP32"


def test_strict_tolerance_rejects_int8_with_its_numbers(
    client: TestClient, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    model, x_train, _ = digits
    response = upload(
        client,
        model,
        "strict8",
        {"precision": "int8", "tolerance": '{"max_abs_error": 1e-9}'},
        {"calibration": npz(**{DIGITS_INPUT: x_train[:200]})},
    )
    assert response.status_code == 202
    status = wait_for_state(client, "strict8", timeout_s=180)
    # The version goes on serving on its FP32 baseline, the gate's verdict in its error.
    assert status["state"] == "fallback" and status["serving"]["tier"] == "baseline"
    error = status["error"]
    assert error["type"] == "accuracy_rejected"
    assert "max_abs_error" in error["message"] and "1e-09" in error["message"]
    assert error["details"]["tolerance"]["max_abs_error"] == pytest.approx(1e-9)
    assert error["details"]["accuracy"]
    # Never "ready": the metrics and the page say fallback too.
    metrics = client.get("/metrics").text
    assert 'kiln_engine_fallback{engine="strict8",version="1"} 1.0' in metrics
    assert 'kiln_engines{state="fallback"}' in metrics
    assert 'kiln_engines{state="fallback"} 0.0' not in metrics
    page = client.get("/ui/api/engines/strict8").json()
    assert [v["state"] for v in page["versions"]] == ["fallback"]
    overview = client.get("/ui/api/overview").json()
    assert next(e for e in overview["engines"] if e["name"] == "strict8")["state"] == "fallback"


def test_fp16_that_changes_nothing_says_so_and_is_not_ready(client: TestClient, tmp_path: Path) -> None:
    """A model whose every op stays FP32 under the float16 conversion (scikit-learn's
    tree ensemble): the engine is FP32, the report and the state say so."""
    from tests.zoo.models import BY_NAME

    forest = BY_NAME["sklearn-forest"]
    rng = np.random.default_rng(0)
    response = upload(
        client,
        forest.make(tmp_path),
        "forest16",
        {"precision": "fp16"},
        {"validation": npz(**forest.samples(rng, 16))},
    )
    assert response.status_code == 202
    status = wait_for_state(client, "forest16", timeout_s=120)
    assert status["state"] == "fallback" and status["serving"]["tier"] == "optimized"
    report = status["report"]
    assert report["precision"] == "fp32" and report["requested_precision"] == "fp16"
    assert "changed nothing" in report["choice"] and report["fallback"] == report["choice"]
    assert status["error"] == {"type": "fallback", "message": report["fallback"]}


def test_auto_picks_a_precision_and_says_why(
    client: TestClient, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    model, x_train, _ = digits
    response = upload(
        client, model, "auto", {"precision": "auto"}, {"calibration": npz(**{DIGITS_INPUT: x_train[:200]})}
    )
    assert response.status_code == 202
    status = wait_for_state(client, "auto", timeout_s=240)
    assert status["state"] == "ready", status["error"]
    report = status["report"]
    tried = {c["precision"] for c in report["candidates"]}
    assert tried == {"fp32", "fp16", "int8"}
    assert report["precision"] in tried
    assert report["precision"] in report["choice"] and "fastest" in report["choice"]
    for candidate in report["candidates"]:
        if candidate["accepted"]:
            assert set(candidate["latency_ms"]) >= {"1", "8"}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"wrong_name": np.zeros((10, 64), np.float32)}, "wrong_name"),
        ({DIGITS_INPUT: np.zeros((10, 63), np.float32)}, "shape"),
        ({DIGITS_INPUT: np.zeros((0, 64), np.float32)}, "empty|no samples"),
        ({DIGITS_INPUT: np.full((10, 64), np.nan, np.float32)}, "NaN|not finite|infinit"),
        ({DIGITS_INPUT: np.full((10, 64), np.inf, np.float32)}, "inf"),
        ({DIGITS_INPUT: np.array([["a"] * 64] * 10)}, "dtype|string|float"),
    ],
)
def test_bad_calibration_data_gets_a_4xx_naming_the_problem(
    client: TestClient,
    digits: tuple[Path, np.ndarray, np.ndarray],
    arrays: dict[str, np.ndarray],
    message: str,
) -> None:
    model, _, _ = digits
    response = upload(client, model, "bad", {"precision": "int8"}, {"calibration": npz(**arrays)})
    assert response.status_code == 400, response.text
    import re

    assert re.search(message, response.json()["error"]["message"], re.IGNORECASE), response.json()


def test_calibration_that_is_not_npz(client: TestClient, digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    model, _, _ = digits
    response = upload(client, model, "bad", {"precision": "int8"}, {"calibration": b"not a zip file"})
    assert response.status_code == 400
    assert "npz" in response.json()["error"]["message"].lower()


def test_metrics_override_how_an_output_is_judged(
    client: TestClient, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    model, _, x_test = digits
    bad = upload(client, model, "judged", {"precision": "fp16", "metrics": '{"logits": "cosine"}'}, {})
    assert bad.status_code == 400
    assert "metrics names output 'logits', which the model does not have" in bad.json()["error"]["message"]
    unreadable = upload(client, model, "judged", {"precision": "fp16", "metrics": '{"probs": "argmax"}'}, {})
    assert unreadable.status_code == 400 and "top1:axis=K" in unreadable.json()["error"]["message"]

    response = upload(
        client,
        model,
        "judged",
        {"precision": "fp16", "metrics": f'{{"{DIGITS_OUTPUT}": "cosine"}}'},
        {"validation": npz(**{DIGITS_INPUT: x_test[:32]})},
    )
    assert response.status_code == 202, response.text
    status = wait_for_state(client, "judged", timeout_s=120)
    assert status["state"] == "ready", status["error"]
    probs = status["report"]["accuracy"]["results"][0]["outputs"][DIGITS_OUTPUT]
    assert probs["rule"] == "cosine" and probs["rule_reason"] == "the upload's metrics"
    assert "top1_agreement" not in probs
