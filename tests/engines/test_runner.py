"""The runner contract: feeds are checked against the signature before inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.errors import InvalidInput
from engines.onnx_model import load_model, read_signature
from engines.types import BuildOptions


@pytest.fixture
def runner(model_files: dict[str, Path]):
    path = model_files["mlp"]
    signature = read_signature(load_model(path))
    runner = OnnxRuntimeBackend().load(path, signature, BuildOptions(max_batch_size=4))
    yield runner
    runner.close()


def test_wrong_name(runner) -> None:
    with pytest.raises(InvalidInput, match="unknown input"):
        runner.infer({"x": np.zeros((1, 16), np.float32), "z": np.zeros(1, np.float32)})


def test_missing_input(runner) -> None:
    with pytest.raises(InvalidInput, match="missing input"):
        runner.infer({})


def test_wrong_dtype(runner) -> None:
    with pytest.raises(InvalidInput, match="dtype float64"):
        runner.infer({"x": np.zeros((1, 16))})


def test_wrong_rank_and_dims(runner) -> None:
    with pytest.raises(InvalidInput, match="rank 1"):
        runner.infer({"x": np.zeros(16, np.float32)})
    with pytest.raises(InvalidInput, match="dimension 1 must be 16"):
        runner.infer({"x": np.zeros((1, 15), np.float32)})


def test_batch_over_the_limit(runner) -> None:
    with pytest.raises(InvalidInput, match=r"outside this engine's range 1\.\.4"):
        runner.infer({"x": np.zeros((5, 16), np.float32)})


def test_closed_runner_refuses(runner) -> None:
    runner.close()
    runner.close()  # twice is fine
    with pytest.raises(InvalidInput, match="closed"):
        runner.infer({"x": np.zeros((1, 16), np.float32)})
