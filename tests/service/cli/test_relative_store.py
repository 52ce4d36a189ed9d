"""A relative store path (``make serve``'s ``--store data/store``, or ``KILN_STORE``)
is pinned once, at start-up, to the directory kiln starts in, so builds whose tools
change directory (INT8's quantization tools do) still find the store's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli.main import main
from service.settings import Settings
from tests.conftest import upload, wait_for_state

PRECISIONS = ("fp16", "int8", "auto")


def test_a_relative_store_is_pinned_to_the_start_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(store=Path("data/store")).store == tmp_path / "data" / "store"
    monkeypatch.setenv("KILN_STORE", "data/store")
    assert Settings().store == tmp_path / "data" / "store"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KILN_STORE", "~/kiln")
    assert Settings().store == tmp_path / "home" / "kiln"


def _check_serves(status: dict[str, object], precision: str) -> None:
    """The requested precision serves; for auto, every candidate was built and measured."""
    assert status["state"] == "ready" and status["error"] is None, status
    serving = status["serving"]
    assert isinstance(serving, dict) and serving["tier"] == "optimized", status
    if precision != "auto":
        assert serving["precision"] == precision, status
        return
    report = status["report"]
    assert isinstance(report, dict)
    built = {c["precision"]: c for c in report["candidates"]}
    assert set(built) == {"fp32", "fp16", "int8"}, report["candidates"]
    assert all("dropped" not in c and c["latency_ms"] for c in built.values()), report["candidates"]


def test_builds_on_a_relative_store_serve_fp16_int8_and_auto(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(model_files["mlp"], "mlp.onnx")
    np.savez("calib.npz", x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))

    # kiln build --store data/store, every model and data path relative too.
    for precision in PRECISIONS:
        argv = ["build", "mlp.onnx", "--store", "data/store", "--name", f"built-{precision}"]
        code = main(
            [*argv, "--precision", precision, "--calibration", "calib.npz", "--backend", "onnxruntime"]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        summary = json.loads(out.split("\n", 1)[1])  # after the "backend: ..." line
        assert precision == "auto" or summary["precision"] == precision, summary

    # A server on KILN_STORE=data/store serves those and builds its own uploads.
    monkeypatch.setenv("KILN_STORE", "data/store")
    with TestClient(create_app(Settings(backend="onnxruntime"))) as client:
        for precision in PRECISIONS:
            upload(
                client,
                Path("mlp.onnx"),
                f"served-{precision}",
                precision=precision,
                files={"calibration": ("calib.npz", Path("calib.npz").read_bytes())},
            )
        for precision in PRECISIONS:
            _check_serves(wait_for_state(client, f"built-{precision}"), precision)
            _check_serves(wait_for_state(client, f"served-{precision}"), precision)
    assert not list(Path("data/store/tmp").iterdir())
