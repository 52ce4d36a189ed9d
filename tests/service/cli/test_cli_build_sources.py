"""``kiln build`` with a model named by URI (a real S3 server), and ``--sha256``."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli.main import main
from service.settings import Settings
from tests.conftest import wait_for_state
from tests.models import reference_outputs
from tests.s3server import SeaweedS3


def test_a_build_from_an_s3_uri_is_served_without_a_rebuild(
    tmp_path: Path, s3: SeaweedS3, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = model_files["mlp"].read_bytes()
    uri = s3.put(f"cli/{uuid.uuid4().hex}/mlp.onnx", data)
    store = tmp_path / "store"
    args = ["build", uri, "--store", str(store), "--backend", "onnxruntime"]
    assert main([*args, "--sha256", hashlib.sha256(data).hexdigest()]) == 0
    assert '"name": "mlp"' in capsys.readouterr().out  # named after the object
    assert not list((store / "tmp").iterdir())
    with TestClient(create_app(Settings(store=store, backend="onnxruntime"))) as client:
        status = wait_for_state(client, "mlp")
        assert status["state"] == "ready" and status["model_filename"] == "mlp.onnx"
        x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
        response = client.post("/predict", json={"engine": "mlp", "inputs": x.tolist()})
        assert response.status_code == 200
        want = reference_outputs(model_files["mlp"], {"x": x})["y"]
        np.testing.assert_allclose(np.asarray(response.json()["outputs"]["y"]), want, atol=1e-5)
        assert 'kiln_engine_builds_total{result="cached"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_wrong_sha256_exits_2_with_one_line_and_builds_nothing(
    tmp_path: Path,
    s3: SeaweedS3,
    model_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    model = str(model_files["mlp"])
    if where == "s3":
        model = s3.put(f"cli/{uuid.uuid4().hex}/mlp.onnx", model_files["mlp"].read_bytes())
    store = tmp_path / "store"
    code = main(["build", model, "--store", str(store), "--backend", "onnxruntime", "--sha256", "0" * 64])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kiln: ") and "Traceback" not in err, err
    assert f"has sha256 {hashlib.sha256(model_files['mlp'].read_bytes()).hexdigest()}, not the 000" in err
    assert not list((store / "records").glob("*/*.json"))
    assert not list((store / "models").iterdir()) and not list((store / "tmp").iterdir())
