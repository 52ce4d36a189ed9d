"""INT8 quantization runs ONNX Runtime's tools in a scratch working directory; the
paths it is given, relative ones included, must still name the same files there."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.precision import quantize_int8
from engines.types import CalibrationMethod


def test_int8_quantization_takes_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_files: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(model_files["mlp"], "mlp.onnx")
    samples = {"x": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)}
    report = quantize_int8(
        Path("mlp.onnx"), Path("out/mlp.int8.onnx"), samples, method=CalibrationMethod.MINMAX
    )
    assert report["pre_process"] == "symbolic shape inference"
    ops = {node.op_type for node in onnx.load(tmp_path / "out" / "mlp.int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert Path.cwd() == tmp_path and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mlp.int8.onnx"
    ]
