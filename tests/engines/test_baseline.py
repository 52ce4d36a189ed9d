"""The baseline engine: the upload itself at FP32 on ONNX Runtime, CUDA provider first
where ONNX Runtime lists it (faked provider lists here), else the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.baseline import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    CUDA_QUICK_START,
    baseline_providers,
    load_baseline,
)
from engines.errors import UnsupportedModel
from engines.types import BuildOptions
from tests.fakes.onnxruntime_gpu import GpuOrtSession, install_fake_onnxruntime_gpu
from tests.models import reference_outputs
from tests.precision_models import DIGITS_INPUT, DIGITS_OUTPUT, signature_of, train_digits_classifier

OPTIONS = BuildOptions(max_batch_size=8)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path, _, x_test = train_digits_classifier(tmp_path_factory.mktemp("digits"))
    return path, x_test


@pytest.fixture
def gpu_ort(monkeypatch: pytest.MonkeyPatch) -> type[GpuOrtSession]:
    return install_fake_onnxruntime_gpu(monkeypatch)


def test_cuda_provider_comes_first_with_quick_start_options_when_listed() -> None:
    listed = ["TensorrtExecutionProvider", CUDA_PROVIDER, CPU_PROVIDER]
    providers = baseline_providers(listed)
    assert providers == [(CUDA_PROVIDER, CUDA_QUICK_START), CPU_PROVIDER]
    options = providers[0][1]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["use_tf32"] == "0"


def test_the_cpu_alone_when_cuda_is_not_listed() -> None:
    assert baseline_providers([CPU_PROVIDER]) == [CPU_PROVIDER]
    assert baseline_providers(["AzureExecutionProvider", CPU_PROVIDER]) == [CPU_PROVIDER]


def test_baseline_runs_on_the_cuda_provider_when_onnxruntime_lists_it(
    gpu_ort: type[GpuOrtSession], digits: tuple[Path, np.ndarray]
) -> None:
    path, x_test = digits
    runner = load_baseline(path, signature_of(path), OPTIONS)
    try:
        assert runner.provider == CUDA_PROVIDER
        assert gpu_ort.created == [[(CUDA_PROVIDER, CUDA_QUICK_START), CPU_PROVIDER]]
        outputs = runner.infer({DIGITS_INPUT: x_test[:8]})
    finally:
        runner.close()
    expected = reference_outputs(path, {DIGITS_INPUT: x_test[:8]})[DIGITS_OUTPUT]
    np.testing.assert_allclose(outputs[DIGITS_OUTPUT], expected, rtol=1e-5, atol=1e-6)


def test_a_cuda_provider_that_cannot_start_falls_back_to_the_cpu(
    gpu_ort: type[GpuOrtSession], digits: tuple[Path, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    gpu_ort.fail_on_cuda = True
    path, x_test = digits
    with caplog.at_level(logging.WARNING, logger="kiln.engines"):
        runner = load_baseline(path, signature_of(path), OPTIONS)
    try:
        assert runner.provider == CPU_PROVIDER
        assert gpu_ort.created[-1] == [CPU_PROVIDER]
        assert runner.infer({DIGITS_INPUT: x_test[:2]})[DIGITS_OUTPUT].shape == (2, 10)
    finally:
        runner.close()
    assert "CUDA provider cannot start" in caplog.text and "no CUDA-capable device" in caplog.text


def test_baseline_on_this_cpu_equals_the_fp32_model(digits: tuple[Path, np.ndarray]) -> None:
    path, x_test = digits
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    runner = load_baseline(path, signature_of(path), OPTIONS, backend=backend, instances=2)
    try:
        assert runner.provider == CPU_PROVIDER
        assert runner.max_batch_size == 8
        for batch in (1, 8):
            feeds = {DIGITS_INPUT: x_test[:batch]}
            expected = reference_outputs(path, feeds)[DIGITS_OUTPUT]
            np.testing.assert_allclose(runner.infer(feeds)[DIGITS_OUTPUT], expected, rtol=1e-5, atol=1e-6)
    finally:
        runner.close()


def test_a_model_onnx_runtime_cannot_run_is_unsupported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("KilnMystery", ["x"], ["y"], domain="com.example")],
        "mystery",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    path = tmp_path / "mystery.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(UnsupportedModel, match="ONNX Runtime cannot load the model"):
        load_baseline(path, signature_of(path), OPTIONS)
