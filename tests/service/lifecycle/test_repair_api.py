"""Precision repair through the upload API: on by default, off with repair=false, its
budgets as form fields, its report in the engine's status, reused for an identical
upload."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests import repair_models
from tests.conftest import upload, wait_for_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return repair_models.fp16_overflow_mlp(tmp_path_factory.mktemp("repair-api"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(store=tmp_path_factory.mktemp("repair-store"), backend="onnxruntime")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def validation() -> dict[str, tuple[str, bytes, str]]:
    buffer = io.BytesIO()
    np.savez(buffer, **{repair_models.INPUT: repair_models.digits_split()[1]})
    return {"validation": ("validation.npz", buffer.getvalue(), "application/octet-stream")}


def test_fp16_is_repaired_by_default_and_served(client: TestClient, model: Path) -> None:
    upload(client, model, "overflow16", precision="fp16", files=validation())
    status = wait_for_state(client, "overflow16", timeout_s=120)
    assert status["state"] == "ready", status["error"]
    assert status["serving"]["tier"] == "optimized" and status["serving"]["precision"] == "fp16"
    assert status["build_options"]["repair"] is True
    repair = status["report"]["repair"]
    assert repair["passed"] and repair["failed_at_first"]["violations"]
    assert "Relu1" in {node["name"] for node in repair["kept_fp32"]}
    assert {"latency_vs_fp32", "latency_vs_unrepaired", "seconds"} <= set(repair)

    x = repair_models.digits_split()[1][:4]
    response = client.post("/predict", json={"engine": "overflow16", "inputs": x.tolist()})
    assert response.status_code == 200, response.text
    assert np.all(np.isfinite(response.json()["outputs"][repair_models.PROBABILITIES]))

    # An identical upload has the same cache key: the repaired engine is reused as built.
    upload(client, model, "overflow16-again", precision="fp16", files=validation())
    again = wait_for_state(client, "overflow16-again", timeout_s=60)
    assert again["state"] == "ready"
    assert again["report"]["cache_key"] == status["report"]["cache_key"]
    assert again["report"]["repair"] == repair
    assert again["report"]["timings_s"] == status["report"]["timings_s"]


def test_repair_false_rejects_the_candidate_with_its_numbers(client: TestClient, model: Path) -> None:
    upload(client, model, "overflow16-plain", precision="fp16", repair="false", files=validation())
    status = wait_for_state(client, "overflow16-plain", timeout_s=120)
    # The version goes on serving on its FP32 baseline, the gate's verdict in its error.
    assert status["state"] == "fallback" and status["serving"]["tier"] == "baseline"
    error = status["error"]
    assert error["type"] == "accuracy_rejected"
    assert "top1_agreement" in error["message"]
    assert "repair" not in error["details"]


def test_a_spent_node_budget_is_named_in_the_failure(client: TestClient, model: Path) -> None:
    upload(client, model, "overflow16-budget", precision="fp16", repair_max_nodes="1", files=validation())
    status = wait_for_state(client, "overflow16-budget", timeout_s=120)
    assert status["state"] == "fallback" and status["serving"]["tier"] == "baseline"
    assert status["error"]["type"] == "accuracy_rejected"
    repair = status["error"]["details"]["repair"]
    assert "the node budget is spent" in repair["stopped"]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("repair", "maybe", "repair"),
        ("repair_max_nodes", "0", "repair_max_nodes"),
        ("repair_seconds", "-5", "repair_seconds"),
    ],
)
def test_bad_repair_fields_are_a_400_naming_the_field(
    client: TestClient, model: Path, field: str, value: str, expected: str
) -> None:
    files = {"model": (model.name, model.read_bytes(), "application/octet-stream")}
    response = client.post("/engines", files=files, data={"name": "bad", "precision": "fp16", field: value})
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]["message"]


def test_kiln_build_repairs_unless_told_not_to(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli.main import main

    command = [
        "build",
        str(model),
        "--store",
        str(tmp_path),
        "--precision",
        "fp16",
        "--backend",
        "onnxruntime",
    ]
    assert main([*command, "--repair", "false"]) == 1
    assert "the fp16 engine is outside tolerance" in capsys.readouterr().err
    assert main(command) == 0
    assert '"kept_fp32": [' in capsys.readouterr().out
