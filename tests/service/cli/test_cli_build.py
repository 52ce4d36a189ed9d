"""``kiln build``: an offline build into a store that a server then serves as is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli.main import main
from service.settings import Settings
from tests.conftest import wait_for_state
from tests.models import reference_outputs


def test_offline_build_is_served_without_a_rebuild(
    tmp_path: Path, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert (
        main(
            [
                "build",
                str(model_files["mlp"]),
                "--store",
                str(store),
                "--name",
                "offline",
                "--backend",
                "onnxruntime",
            ]
        )
        == 0
    )
    assert '"name": "offline"' in capsys.readouterr().out
    with TestClient(create_app(Settings(store=store, backend="onnxruntime"))) as client:
        assert wait_for_state(client, "offline")["state"] == "ready"
        x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
        response = client.post("/predict", json={"engine": "offline", "inputs": x.tolist()})
        assert response.status_code == 200
        want = reference_outputs(model_files["mlp"], {"x": x})["y"]
        np.testing.assert_allclose(np.asarray(response.json()["outputs"]["y"]), want, atol=1e-5)
        metrics = client.get("/metrics").text
        assert 'kiln_engine_builds_total{result="cached"} 1.0' in metrics
        assert 'kiln_engine_builds_total{result="succeeded"} 0.0' in metrics


def test_offline_build_of_a_bad_file_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["build", str(bad), "--store", str(tmp_path / "store"), "--backend", "onnxruntime"]) == 1
    assert "not an ONNX model" in capsys.readouterr().err


def test_offline_build_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(tmp_path / "nope.onnx"), "--store", str(tmp_path / "store")]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_offline_int8_needs_calibration_data_or_an_explicit_synthetic(
    tmp_path: Path, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, store = str(model_files["mlp"]), str(tmp_path / "store")
    assert main(["build", model, "--store", store, "--precision", "int8", "--backend", "onnxruntime"]) == 1
    assert "int8 needs calibration data" in capsys.readouterr().err
    assert (
        main(
            [
                "build",
                model,
                "--store",
                store,
                "--precision",
                "int8",
                "--calibration",
                "synthetic",
                "--backend",
                "onnxruntime",
            ]
        )
        == 0
    )
    assert '"precision": "int8"' in capsys.readouterr().out
