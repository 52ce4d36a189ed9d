"""``kiln build``: an offline build into a store that a server then serves as is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli.main import UPLOAD_OPTIONS, main
from service.lifecycle.options import UploadFields
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


BAD_INPUTS = {
    "bad name": (["--name", "bad name"], "engine names are 1-64 characters"),
    "shapes change a fixed dimension": (
        ["--shapes", '{"x": {"min": [1, 16], "opt": [1, 16], "max": [1, 8]}}'],
        "the model fixes dimension 1 at 16",
    ),
    "shapes of an unknown input": (
        ["--shapes", '{"z": {"min": [1], "opt": [1], "max": [1]}}'],
        "shapes names input 'z' that the model does not have",
    ),
    "shapes not JSON": (["--shapes", "{x"], "shapes: Value error, must be a JSON object"),
    "int8 without data": (["--precision", "int8"], "precision=int8 needs calibration data"),
    "unknown precision": (["--precision", "int4"], "precision: Input should be"),
    "preferred above max": (
        ["--max-batch-size", "4", "--preferred-batch-sizes", "8"],
        "preferred_batch_sizes must lie between 1 and max_batch_size (4)",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_registers_nothing(
    tmp_path: Path, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str
) -> None:
    flags, message = BAD_INPUTS[case]
    store = tmp_path / "store"
    code = main(["build", str(model_files["mlp"]), "--store", str(store), "--backend", "onnxruntime", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kiln: "), err
    assert message in err and "Traceback" not in err
    assert not list((store / "records").glob("*/*.json"))
    assert not list((store / "models").iterdir())


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    store = tmp_path_factory.mktemp("http-store")
    with TestClient(create_app(Settings(store=store, backend="onnxruntime"))) as client:
        yield client, store


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_the_same_bad_input_over_http_is_400_before_anything_is_registered(
    http: tuple[TestClient, Path], model_files: dict[str, Path], case: str
) -> None:
    client, store = http
    flags, message = BAD_INPUTS[case]
    fields = {"name": "mlp"} | {
        flag[2:].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2], strict=True)
    }
    response = client.post(
        "/engines",
        data=fields,
        files={"model": ("mlp.onnx", model_files["mlp"].read_bytes(), "application/octet-stream")},
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert client.get("/engines").json()["engines"] == []
    assert not list((store / "records").glob("*/*.json")) and not list((store / "models").iterdir())


def test_every_upload_field_is_a_build_flag() -> None:
    assert set(UPLOAD_OPTIONS) == (set(UploadFields.model_fields) - {"name"}) | {"validation"}


def test_build_options_reach_the_version(
    tmp_path: Path, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    args = ["build", str(model_files["mlp"]), "--store", str(store), "--backend", "onnxruntime"]
    flags = ["--max-batch-size", "4", "--preferred-batch-sizes", "2,4", "--max-queue-delay-ms", "3"]
    assert main([*args, *flags]) == 0
    assert main([*args, "--name", "mlp"]) == 0  # the next version is numbered by the registry
    out = capsys.readouterr().out
    assert '"version": 2' in out
    records = {int(p.stem): json.loads(p.read_text()) for p in (store / "records" / "mlp").glob("*.json")}
    assert sorted(records) == [1, 2] and {r["state"] for r in records.values()} == {"ready"}
    assert records[1]["batching"]["max_batch_size"] == 4
    assert records[1]["batching"]["preferred_batch_sizes"] == [2, 4]
    assert records[1]["batching"]["max_queue_delay_ms"] == 3.0
    assert records[2]["batching"]["max_batch_size"] == 8


def test_offline_build_of_a_bad_file_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["build", str(bad), "--store", str(tmp_path / "store"), "--backend", "onnxruntime"]) == 2
    assert "not an ONNX model" in capsys.readouterr().err


def test_offline_build_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(tmp_path / "nope.onnx"), "--store", str(tmp_path / "store")]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_offline_int8_with_synthetic_calibration(
    tmp_path: Path, model_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, store = str(model_files["mlp"]), str(tmp_path / "store")
    args = ["build", model, "--store", store, "--precision", "int8", "--backend", "onnxruntime"]
    assert main([*args, "--calibration", "synthetic"]) == 0
    assert '"precision": "int8"' in capsys.readouterr().out
